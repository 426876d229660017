// A shell in an instance, in a modal: xterm.js on the host's exec websocket
// (api::exec; the same protocol as `rivernode connect`).
//
//   client → host   text   {"command": [...], "tty": true, "cols": C, "rows": R}   (first frame)
//   client → host   binary [0, ...keys as UTF-8]                                  (stdin)
//   client → host   text   {"resize": {"cols": C, "rows": R}}
//   host → client   binary [1 or 2, ...output]                                    (stdout, stderr)
//   host → client   text   {"exit_code": N | null, "error": "..." | null}        (last frame)

import { html } from 'htm/preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { get, openExec } from './api.js';

const STDIN = 0;
const STDOUT = 1;
const STDERR = 2;

/**
 * What `rivernode connect` runs without a shell argument
 * (cli::terminal::login_shell(None)): bash where the image has it, else sh,
 * as a login shell.
 */
export const LOGIN_SHELL = [
  '/bin/sh',
  '-c',
  'if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi',
];

/** A binary frame: the stream's byte, then the data. */
function frame(stream, data) {
  const f = new Uint8Array(data.length + 1);
  f[0] = stream;
  f.set(data, 1);
  return f;
}

/*
 * xterm.js puts its measured cell sizes and its colours into <style>
 * elements it creates. The host's Content-Security-Policy allows no inline
 * styles: the browser would ignore them (and log an error for each). So
 * while xterm builds its DOM, its <style> elements are made as inert
 * <rn-style> elements instead (hidden by style.css), and their text is
 * copied into a constructed stylesheet, which the policy allows because our
 * own script makes it, and kept in step as xterm rewrites it.
 *
 * What remains: xterm's 24-bit colours are `style` attributes, which the
 * policy blocks; such text shows in the default colour.
 */
const INERT_STYLE = 'rn-style';

function openWithoutInlineStyles(term, parent) {
  const create = Document.prototype.createElement;
  document.createElement = function createElement(tag, options) {
    return create.call(this, String(tag).toLowerCase() === 'style' ? INERT_STYLE : tag, options);
  };
  try {
    term.open(parent);
  } finally {
    delete document.createElement; // the prototype's again
  }
}

function mirrorStyles(root) {
  if (!('adoptedStyleSheets' in document)) return () => {};
  const sheet = new CSSStyleSheet();
  document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
  let last = null;
  const sync = () => {
    // Real <style> too, should a later xterm make one after open().
    const css = Array.from(root.querySelectorAll(`style, ${INERT_STYLE}`), (s) => s.textContent).join('\n');
    if (css !== last) {
      last = css;
      sheet.replaceSync(css);
    }
  };
  const watch = new MutationObserver(sync);
  watch.observe(root, { subtree: true, childList: true, characterData: true });
  sync();
  return () => {
    watch.disconnect();
    document.adoptedStyleSheets = document.adoptedStyleSheets.filter((s) => s !== sheet);
  };
}

/** Lines of the terminal's active buffer as text (for tests, via window.__rnTerm). */
function bufferLines(term) {
  const buf = term.buffer.active;
  const lines = [];
  for (let i = 0; i < buf.length; i += 1) lines.push(buf.getLine(i)?.translateToString(true) ?? '');
  return lines;
}

export function TerminalModal({ task, onClose }) {
  const box = useRef(null);
  const [status, setStatus] = useState('connecting…');

  useEffect(() => {
    const term = new Terminal({
      cursorBlink: true,
      fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono", monospace',
      fontSize: 13,
      scrollback: 5000,
      theme: { background: '#0d1117', foreground: '#d6dde6', cursor: '#7cc4ff', selectionBackground: '#2f4a66' },
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    openWithoutInlineStyles(term, box.current);
    const unmirror = mirrorStyles(box.current);
    fit.fit();

    const ws = openExec(task.id);
    const utf8 = new TextEncoder();
    let opened = false;
    let ended = false;
    const send = (data) => ws.readyState === WebSocket.OPEN && ws.send(data);

    ws.onopen = () => {
      opened = true;
      ws.send(JSON.stringify({ command: LOGIN_SHELL, tty: true, cols: term.cols, rows: term.rows }));
      setStatus('connected');
      term.focus();
    };
    ws.onmessage = (ev) => {
      if (typeof ev.data === 'string') {
        // The end: the command's exit status, or why it could not run.
        ended = true;
        let end = {};
        try {
          end = JSON.parse(ev.data);
        } catch {
          end = { error: ev.data };
        }
        const text = end.exit_code != null ? `[exited ${end.exit_code}]` : `[${end.error ?? 'ended'}]`;
        term.write(`\r\n\x1b[2m${text}\x1b[0m\r\n`);
        setStatus(end.exit_code != null ? `exited ${end.exit_code}` : 'ended');
        return;
      }
      const bytes = new Uint8Array(ev.data);
      // With a terminal both streams are one; write stderr too, in case.
      if (bytes.length > 1 && (bytes[0] === STDOUT || bytes[0] === STDERR)) term.write(bytes.subarray(1));
    };
    ws.onclose = async (ev) => {
      if (ended) return;
      if (opened) {
        term.write(`\r\n\x1b[2m[connection closed${ev.reason ? `: ${ev.reason}` : ''}]\x1b[0m\r\n`);
        setStatus('closed');
        return;
      }
      // A refused upgrade tells a page nothing (no status, no body): ask
      // the host about the task instead, which usually says why.
      setStatus('refused');
      let why = 'the host refused the terminal';
      try {
        const t = await get(`/api/tasks/${task.id}`);
        if (t.state !== 'running') why = `#${task.id} is ${t.state}, not running`;
      } catch (e) {
        why = e.message;
      }
      term.write(`\x1b[31m[could not open a terminal: ${why}]\x1b[0m\r\n`);
    };

    const keys = term.onData((data) => send(frame(STDIN, utf8.encode(data))));
    // Some mouse reports come as raw bytes, not text.
    const raw = term.onBinary((data) => send(frame(STDIN, Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff))));
    const resize = term.onResize(({ cols, rows }) => send(JSON.stringify({ resize: { cols, rows } })));
    // Refit when the modal changes size (window resize, zoom).
    const observer = new ResizeObserver(() => {
      if (box.current && box.current.clientWidth > 0) fit.fit();
    });
    observer.observe(box.current);

    // For end-to-end tests: the screen's text, read from xterm's buffer
    // rather than from its DOM (which depends on the renderer).
    window.__rnTerm = { lines: () => bufferLines(term) };

    return () => {
      delete window.__rnTerm;
      observer.disconnect();
      keys.dispose();
      raw.dispose();
      resize.dispose();
      ws.onclose = null;
      ws.close();
      unmirror();
      term.dispose();
    };
  }, [task.id]);

  return html`
    <div class="modal-back">
      <div class="modal terminal-modal" role="dialog" aria-label=${`Terminal of #${task.id}`}>
        <header class="modal-head">
          <strong>Terminal</strong>
          <span class="muted">#${task.id}${task.placement ? ` on ${task.placement.node}` : ''}</span>
          <span class="muted small" data-test="terminal-status">${status}</span>
          <span class="spacer"></span>
          <button data-test="close-terminal" onClick=${onClose}>Close</button>
        </header>
        <div class="term" data-test="xterm" ref=${box}></div>
      </div>
    </div>
  `;
}
