// Server-sent events read from a fetch() body. EventSource cannot send an Authorization
// header, so the page reads the stream itself. Parsing follows the HTML standard's
// event-stream rules: lines end in CRLF, LF or CR (a chunk may end between CR and LF),
// `:` starts a comment (the server's `: ping` heartbeats), one space after the colon is
// dropped, and an event is dispatched at a blank line only if it has data.

export class EventStreamParser {
  #buffer = '';
  #data = [];
  #event = '';
  lastEventId = '';

  /** Feed decoded text; returns the events it completes, as {event, data, id}. */
  push(text) {
    this.#buffer += text;
    const buf = this.#buffer;
    const events = [];
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf[i];
      if (c !== '\n' && c !== '\r') continue;
      if (c === '\r' && i + 1 === buf.length) break; // maybe the first half of CRLF
      const line = buf.slice(start, i);
      if (c === '\r' && buf[i + 1] === '\n') i++;
      start = i + 1;
      const event = this.#line(line);
      if (event) events.push(event);
    }
    this.#buffer = buf.slice(start);
    return events;
  }

  #line(line) {
    if (line === '') {
      const event = this.#data.length
        ? { event: this.#event || 'message', data: this.#data.join('\n'), id: this.lastEventId }
        : null;
      this.#data = [];
      this.#event = '';
      return event;
    }
    if (line.startsWith(':')) return null;
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') this.#event = value;
    else if (field === 'data') this.#data.push(value);
    else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
    return null; // `retry` and unknown fields are ignored
  }
}

/** The events of a ReadableStream of bytes, as they arrive; an unfinished last event is
 *  dropped, as the standard says. Leaving the loop early cancels the stream. */
export async function* parseEventStream(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new EventStreamParser();
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        return;
      }
      yield* parser.push(value);
    }
  } finally {
    if (!finished) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}
