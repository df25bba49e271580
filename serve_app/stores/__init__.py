"""Job stores: the contract, its implementations (memory, SQLite, Redis) and the factory."""
