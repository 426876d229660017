// The page: sign-in until a person's token is known, then the dashboard,
// which polls the host every 2 seconds (the API has no push for browsers;
// polling a small cluster's lists is cheap).

import { html } from 'htm/preact';
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { get, savedToken, saveToken, whoami } from './api.js';
import { NewVps } from './create.js';
import { TaskDetail } from './detail.js';
import { NodesPanel } from './nodes.js';
import { notAPerson, SignIn } from './signin.js';
import { TasksPanel } from './tasks.js';
import { TerminalModal } from './terminal.js';

const POLL_MS = 2000;

/**
 * Runs `fn` now and then `ms` after each run ends (never two at once),
 * until the component goes; skipped while the tab is hidden.
 */
function usePoll(fn, ms) {
  const latest = useRef(fn);
  latest.current = fn;
  useEffect(() => {
    let alive = true;
    let timer;
    async function tick() {
      if (!document.hidden) {
        try {
          await latest.current();
        } catch {
          // fn reports its own errors.
        }
      }
      if (alive) timer = setTimeout(tick, ms);
    }
    tick();
    return () => {
      alive = false;
      clearTimeout(timer);
    };
  }, [ms]);
}

function Header({ me, onSignOut }) {
  return html`
    <header class="top">
      <div class="brand"><span class="logo" aria-hidden="true"></span>rivernode</div>
      ${me.public_address && html`<span class="top-muted">${me.public_address}</span>`}
      <span class="spacer"></span>
      <span class="top-muted">signed in as</span>
      <strong data-test="whoami">${me.user ?? me.role}</strong>
      ${me.user && html`<span class="chip dark">${me.role}</span>`}
      <button class="ghost" data-test="sign-out" onClick=${() => onSignOut()}>Sign out</button>
    </header>
  `;
}

function Dashboard({ me, onSignOut }) {
  const [tasks, setTasks] = useState(null); // null until the first answer
  const [nodes, setNodes] = useState(null);
  // Users may not read nodes (the host answers 403); don't even ask, so
  // the browser's console stays clean. A 403 for anyone else hides it too.
  const [nodesHidden, setNodesHidden] = useState(me.role === 'user');
  const [environments, setEnvironments] = useState(null);
  const [pollError, setPollError] = useState(null); // clears itself on the next good poll
  const [error, setError] = useState(null); // what an action of ours met; stays until dismissed
  const [notice, setNotice] = useState(null);
  const [selected, setSelected] = useState(null);
  const [terminal, setTerminal] = useState(null); // the task whose terminal is open
  // Answers can arrive out of order (a poll, then an action's refresh):
  // only the newest request's answer is applied.
  const seq = useRef(0);

  const load = useCallback(async () => {
    const mine = ++seq.current;
    const wantNodes = !nodesHidden;
    const [t, n] = await Promise.allSettled([get('/api/tasks'), wantNodes ? get('/api/nodes') : Promise.resolve(null)]);
    if (mine !== seq.current) return;
    const failed = [t, n].find((r) => r.status === 'rejected' && !(r === n && r.reason.status === 403));
    if (failed?.reason.status === 401) {
      onSignOut(`The host no longer accepts this token: ${failed.reason.message}`);
      return;
    }
    if (t.status === 'fulfilled') setTasks(t.value);
    if (n.status === 'fulfilled' && n.value) setNodes(n.value);
    if (n.status === 'rejected' && n.reason.status === 403) setNodesHidden(true);
    setPollError(failed ? failed.reason.message : null);
  }, [nodesHidden, onSignOut]);

  usePoll(load, POLL_MS);

  useEffect(() => {
    // Only for the create form's suggestions: without it, one types a name.
    get('/api/environments').then(setEnvironments, () => {});
  }, []);

  // A notice ("snapshot taken") goes away by itself.
  useEffect(() => {
    if (!notice) return undefined;
    const t = setTimeout(() => setNotice(null), 8000);
    return () => clearTimeout(t);
  }, [notice]);

  const refresh = () => load();
  const selectedTask = tasks?.find((t) => t.id === selected);

  return html`
    <${Header} me=${me} onSignOut=${onSignOut} />
    <main class="page">
      ${(error || pollError) &&
      html`<div class="banner error" role="alert" data-test="error">
        <span>${error ?? pollError}</span>
        ${error && html`<button class="ghost small dismiss" onClick=${() => setError(null)} title="Dismiss" aria-label="Dismiss"></button>`}
      </div>`}
      ${notice && html`<div class="banner ok" data-test="notice">${notice}</div>`}
      ${!nodesHidden && nodes && html`<${NodesPanel} nodes=${nodes} />`}
      ${me.role !== 'viewer' &&
      html`<${NewVps}
        environments=${environments}
        onError=${setError}
        onCreated=${() => refresh()}
      />`}
      <${TasksPanel}
        tasks=${tasks}
        me=${me}
        selected=${selected}
        onSelect=${(id) => setSelected(id)}
        onTerminal=${(id) => setTerminal(tasks.find((t) => t.id === id) ?? { id })}
        onError=${setError}
        onNotice=${setNotice}
        refresh=${refresh}
      />
      ${selectedTask &&
      html`<${TaskDetail}
        key=${selectedTask.id}
        task=${selectedTask}
        me=${me}
        onClose=${() => setSelected(null)}
        onTerminal=${() => setTerminal(selectedTask)}
        onError=${setError}
        onNotice=${setNotice}
      />`}
    </main>
    ${terminal && html`<${TerminalModal} task=${terminal} onClose=${() => setTerminal(null)} />`}
  `;
}

export function App() {
  const [me, setMe] = useState(null);
  // A token kept from earlier in this tab is checked before anything shows.
  const [checking, setChecking] = useState(() => savedToken() != null);
  const [signInError, setSignInError] = useState(null);

  const signOut = useCallback((why) => {
    saveToken(null);
    setMe(null);
    setSignInError(why ?? null);
  }, []);

  useEffect(() => {
    const t = savedToken();
    if (!t) return;
    whoami(t)
      .then((m) => {
        const why = notAPerson(m);
        if (why) signOut(why);
        else setMe(m);
      })
      .catch((e) => {
        // Forget a token the host refuses; keep it over a network hiccup,
        // so reloading the page later signs in again.
        if (e.status === 401) saveToken(null);
        setSignInError(e.message);
      })
      .finally(() => setChecking(false));
  }, []);

  if (checking) return html`<main class="signin"><p class="muted">Signing in…</p></main>`;
  if (!me) {
    return html`<${SignIn}
      key=${signInError}
      error=${signInError}
      onSignedIn=${(t, m) => {
        saveToken(t);
        setSignInError(null);
        setMe(m);
      }}
    />`;
  }
  return html`<${Dashboard} me=${me} onSignOut=${signOut} />`;
}
