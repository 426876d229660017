// Everything that talks to the host: the JSON API, the raw log endpoint and
// the exec websocket. The page is served by the host itself, so every URL
// is relative to the page's origin and no CORS is involved.

// sessionStorage, not localStorage: the token is a password, so it should
// not outlive the browser tab (and is not shared with other tabs).
const TOKEN_KEY = 'rivernode.token';

let token = sessionStorage.getItem(TOKEN_KEY);

export function savedToken() {
  return token;
}

export function saveToken(t) {
  token = t;
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** A refusal from the host (`{"error": "..."}` with a 4xx/5xx status), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** The `error` text of a failed answer, falling back to its body or status line. */
async function refusal(resp) {
  const text = await resp.text().catch(() => '');
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === 'string') return new ApiError(resp.status, body.error);
  } catch {
    // Not JSON: a proxy's error page, say. Show its text as it is.
  }
  return new ApiError(resp.status, text.trim() || `${resp.status} ${resp.statusText}`);
}

/** fetch() with our token; network failures become an ApiError too. */
async function send(method, path, { body, with: bearer = token } = {}) {
  const headers = { Authorization: `Bearer ${bearer}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      // The token is the only credential; no cookies are involved.
      credentials: 'omit',
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, `cannot reach the host: ${e.message}`);
  }
  if (!resp.ok) throw await refusal(resp);
  return resp;
}

/** A JSON call; the parsed answer, or null for an empty one (204). */
export async function call(method, path, options) {
  const resp = await send(method, path, options);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

export const get = (path, options) => call('GET', path, options);
// Actions take no body; an empty POST is what the host expects for them.
export const post = (path, body) => call('POST', path, { body });

/**
 * Who a token belongs to. Takes the token explicitly because sign-in checks
 * a token before it is saved.
 */
export function whoami(bearer) {
  return get('/api/whoami', { with: bearer });
}

/**
 * One read of a task's log from byte `offset`: `{bytes, next}`. The host
 * answers at most 1 MiB per read and says where the next read starts in
 * `x-next-offset`; without the header we count the bytes ourselves.
 */
export async function readLog(id, stream, offset) {
  const q = new URLSearchParams({ stream, offset: String(offset) });
  const resp = await send('GET', `/api/tasks/${id}/logs?${q}`);
  const data = new Uint8Array(await resp.arrayBuffer());
  const header = Number.parseInt(resp.headers.get('x-next-offset') ?? '', 10);
  return { bytes: data, next: Number.isFinite(header) ? header : offset + data.length };
}

/** Largest answer the runner gives to one log read (runner::api LOG_CHUNK). */
export const LOG_CHUNK = 1 << 20;

/**
 * The exec websocket of task `id`. Browsers cannot set Authorization on a
 * websocket, so the token travels as a second subprotocol
 * (`rivernode.bearer.<token>`); the host answers with `rivernode.exec`.
 * Same host and port as the page; wss when the page came over https.
 */
export function openExec(id) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}/api/tasks/${id}/exec`, [
    'rivernode.exec',
    `rivernode.bearer.${token}`,
  ]);
  ws.binaryType = 'arraybuffer';
  return ws;
}
