// The sign-in page: one token field. The token is checked with
// /api/whoami before it is kept, so a typo shows the host's own refusal.

import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { whoami } from './api.js';

/** Roles whose tokens belong to people; the others are machines' (node, join, metrics). */
export const PEOPLE = ['admin', 'operator', 'viewer', 'user'];

/** Why `me` cannot use the dashboard, or null when it can. */
export function notAPerson(me) {
  if (PEOPLE.includes(me.role)) return null;
  return `This is a ${me.role} token, not a person's: sign in with your user token (or the admin's).`;
}

export function SignIn({ onSignedIn, error: initialError }) {
  const [value, setValue] = useState('');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(initialError);

  async function submit(e) {
    e.preventDefault();
    const t = value.trim();
    if (!t) {
      setError('Paste your token first.');
      return;
    }
    setBusy(true);
    setError(null);
    try {
      const me = await whoami(t);
      const why = notAPerson(me);
      if (why) setError(why);
      else onSignedIn(t, me);
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  }

  return html`
    <main class="signin">
      <form class="card signin-card" onSubmit=${submit}>
        <h1><span class="logo" aria-hidden="true"></span>rivernode</h1>
        <p class="muted">Sign in with your rivernode token: the one in <code>~/.config/rivernode/client.toml</code>, or the admin's <code>admin.token</code>.</p>
        <label>
          Token
          <input
            type="password"
            data-test="token"
            autocomplete="off"
            autofocus
            placeholder="rnusr_…"
            value=${value}
            onInput=${(e) => setValue(e.currentTarget.value)}
          />
        </label>
        ${error && html`<div class="banner error" role="alert" data-test="error">${error}</div>`}
        <button class="primary" type="submit" data-test="sign-in" disabled=${busy}>
          ${busy ? 'Signing in…' : 'Sign in'}
        </button>
        <p class="muted small">The token stays in this tab only (session storage) and is sent to this host alone.</p>
      </form>
    </main>
  `;
}
