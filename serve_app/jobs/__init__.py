"""Job tracking: the state machine, the book of records, queues, lanes, dispatch."""
