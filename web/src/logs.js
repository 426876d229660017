// A task's log, followed: read from where the last read ended, once a
// second, and append. The host relays the runner's file as raw bytes and
// says where to read next in `x-next-offset` (see api.readLog).

import { html } from 'htm/preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { LOG_CHUNK, readLog } from './api.js';
import { stripAnsi } from './format.js';

/** How much text the <pre> keeps; older output is cut (the CLI has the whole log). */
const KEEP_CHARS = 1_000_000;

export function LogView({ task }) {
  const streams = task.spec.kind === 'vps' ? ['stdout', 'stderr', 'onstart.stdout', 'onstart.stderr'] : ['stdout', 'stderr'];
  const [stream, setStream] = useState('stdout');
  const [follow, setFollow] = useState(true);
  const [text, setText] = useState('');
  const [note, setNote] = useState('Loading…');
  const pre = useRef(null);
  // Where the next read starts, and the decoder that keeps a UTF-8
  // character split across two reads whole. Both start over with the stream.
  const pos = useRef({ offset: 0, decoder: new TextDecoder() });
  const atBottom = useRef(true);

  useEffect(() => {
    pos.current = { offset: 0, decoder: new TextDecoder() };
    setText('');
    setNote('Loading…');
  }, [task.id, stream]);

  useEffect(() => {
    let alive = true;
    let timer;
    async function tick() {
      let again = follow ? 1000 : null;
      try {
        const here = pos.current;
        const { bytes, next } = await readLog(task.id, stream, here.offset);
        if (!alive || here !== pos.current) return;
        here.offset = next;
        if (bytes.length > 0) {
          const chunk = stripAnsi(here.decoder.decode(bytes, { stream: true }));
          setText((t) => {
            const all = t + chunk;
            return all.length > KEEP_CHARS ? `… (earlier output cut: rivernode task logs ${task.id})\n${all.slice(-KEEP_CHARS)}` : all;
          });
        }
        setNote(null);
        // A full chunk means there is more already: read on at once.
        if (bytes.length >= LOG_CHUNK) again = 0;
      } catch (e) {
        if (!alive) return;
        // 404: the runner has no file yet (nothing written); 409: not placed yet.
        setNote(e.status === 404 ? 'No output yet.' : e.message);
      }
      if (alive && again != null) timer = setTimeout(tick, again);
    }
    tick();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [task.id, stream, follow]);

  // Keep the newest line in view, unless the reader scrolled up to read.
  useEffect(() => {
    if (pre.current && atBottom.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [text]);

  function onScroll() {
    const el = pre.current;
    atBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
  }

  return html`
    <div class="logs" data-test="log-view">
      <div class="tabs">
        ${streams.map(
          (s) => html`
            <button key=${s} data-test=${`stream-${s}`} class=${s === stream ? 'tab active' : 'tab'} onClick=${() => setStream(s)}>${s}</button>
          `,
        )}
        <span class="spacer"></span>
        <label class="inline small">
          <input type="checkbox" data-test="follow" checked=${follow} onChange=${(e) => setFollow(e.currentTarget.checked)} />
          follow
        </label>
      </div>
      <pre ref=${pre} onScroll=${onScroll} data-test="log-text">${text}</pre>
      ${note && html`<div class="muted small">${note}</div>`}
    </div>
  `;
}
