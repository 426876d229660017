// One task in full: its facts, its logs (followed), and for a VPS its
// snapshots, with restore and delete. Opened from a row's id or Logs button.

import { html } from 'htm/preact';
import { useEffect, useState } from 'preact/hooks';
import { call, get, post } from './api.js';
import { bytes, imageText, when } from './format.js';
import { LogView } from './logs.js';
import { rights } from './tasks.js';

function Snapshots({ task, onError, onNotice }) {
  const [list, setList] = useState(null);
  const [problem, setProblem] = useState(null);
  const [asking, setAsking] = useState(null); // {id, what: 'restore' | 'delete'}
  const [busy, setBusy] = useState(false);

  async function load() {
    try {
      setList(await get(`/api/vps/snapshots/${task.id}`));
      setProblem(null);
    } catch (e) {
      // Not placed yet, or its node is away: say so here, not in the banner.
      setProblem(e.message);
    }
  }

  // Again whenever the state changes: a snapshot taken from the row, a
  // restore that finished.
  useEffect(() => {
    load();
  }, [task.id, task.state]);

  async function act(fn, done) {
    setBusy(true);
    try {
      await fn();
      onError(null);
      onNotice(done);
    } catch (e) {
      onError(e.message);
    } finally {
      setBusy(false);
      setAsking(null);
      load();
    }
  }

  const take = () => act(() => post(`/api/vps/snapshots/${task.id}`, {}), `Snapshot of #${task.id} taken.`);
  // A restore is a restart that first recreates the disk from the snapshot.
  const restore = (s) =>
    act(() => post(`/api/tasks/${task.id}/restart`, { from_snapshot: s.id }), `#${task.id} restarts from snapshot ${s.id}.`);
  const remove = (s) => act(() => call('DELETE', `/api/vps/snapshots/${task.id}/${s.id}`), `Snapshot ${s.id} deleted.`);

  return html`
    <section class="sub">
      <div class="sub-head">
        <h3>Snapshots</h3>
        <span class="spacer"></span>
        <button data-test="take-snapshot" disabled=${busy || task.state === 'deleted'} onClick=${take}>Take snapshot</button>
        <button onClick=${load} title="Reload the list">Reload</button>
      </div>
      ${problem && html`<div class="muted small">${problem}</div>`}
      ${list &&
      (list.length === 0
        ? html`<div class="muted small">None yet.</div>`
        : html`
            <table class="snapshots" data-test="snapshots">
              <thead><tr><th>Snapshot</th><th>Taken</th><th class="num">Size</th><th>Note</th><th></th></tr></thead>
              <tbody>
                ${list.map(
                  (s) => html`
                    <tr key=${s.id}>
                      <td class="mono">${s.id}</td>
                      <td>${when(s.created_at_unix_ms)}</td>
                      <td class="num">${bytes(s.size_bytes)}</td>
                      <td>${[s.message, s.consistency].filter(Boolean).join(' · ')}</td>
                      <td class="actions">
                        ${asking?.id === s.id
                          ? html`<div class="confirm">
                              <span>${asking.what === 'restore' ? 'Restart from it, replacing the disk?' : 'Delete it?'}</span>
                              <button class="danger" disabled=${busy} onClick=${() => (asking.what === 'restore' ? restore(s) : remove(s))}>Yes</button>
                              <button onClick=${() => setAsking(null)}>Cancel</button>
                            </div>`
                          : html`<div class="buttons">
                              <button disabled=${busy} onClick=${() => setAsking({ id: s.id, what: 'restore' })}>Restore</button>
                              <button class="danger-outline" disabled=${busy} onClick=${() => setAsking({ id: s.id, what: 'delete' })}>Delete</button>
                            </div>`}
                      </td>
                    </tr>
                  `,
                )}
              </tbody>
            </table>
          `)}
    </section>
  `;
}

/** The label/value pairs worth showing, skipping what is unknown. */
function facts(task, me) {
  const p = task.placement;
  const spec = task.spec;
  const rows = [
    ['Owner', task.owner ?? 'admin'],
    ['Image', imageText(spec.image)],
    ['Wanted', task.desired],
    ['Node', p?.node],
    ['CPUs', p ? `${p.cpus}${p.numa != null ? ` (NUMA ${p.numa})` : ''}` : `${spec.cores} cores`],
    ['Memory', p ? bytes(p.memory_bytes) : spec.memory_bytes ? bytes(spec.memory_bytes) : 'no limit'],
    ['GPUs', p ? p.gpus.join(', ') || 'none' : String(spec.gpu_count)],
    ['Command', spec.command.length ? spec.command.join(' ') : null],
    ['Submitted', when(task.submitted_at_unix_ms)],
    ['Started', task.started_at_unix_ms && when(task.started_at_unix_ms)],
    ['Finished', task.finished_at_unix_ms && when(task.finished_at_unix_ms)],
    ['Exit code', task.exit_code],
    ['Reason', task.reason],
    ['Message', task.message],
    ['Notice', task.notice],
  ];
  if (spec.kind === 'vps' && !spec.no_ssh) {
    // SSH goes through the host's proxy with the CLI (`rivernode ssh ID`).
    rows.push(['SSH', `rivernode ssh ${task.id}${me.ssh_proxy_port ? `  (proxy port ${me.ssh_proxy_port})` : ''}`]);
    if (task.ssh_host_key) rows.push(['Host key', task.ssh_host_key]);
  }
  return rows.filter(([, v]) => v != null && v !== '');
}

export function TaskDetail({ task, me, onClose, onTerminal, onError, onNotice }) {
  const { use } = rights(me, task);
  return html`
    <section class="card detail" data-test="detail">
      <header class="card-head">
        <h2>${task.spec.kind === 'vps' ? 'VPS' : 'Task'} #${task.id}</h2>
        <span class=${`badge s-${task.state}`}>${task.state}</span>
        <span class="spacer"></span>
        ${use && task.state === 'running' && html`<button data-test="detail-terminal" onClick=${() => onTerminal(task.id)}>Terminal</button>`}
        <button data-test="close-detail" onClick=${onClose} title="Close">✕</button>
      </header>
      <dl class="facts">
        ${facts(task, me).map(([k, v]) => html`<dt key=${`k${k}`}>${k}</dt><dd key=${`v${k}`} class=${k === 'Host key' ? 'mono break' : ''}>${v}</dd>`)}
      </dl>
      ${use && task.placement && html`<section class="sub"><h3>Logs</h3><${LogView} task=${task} /></section>`}
      ${use && task.spec.kind === 'vps' && task.placement && html`<${Snapshots} task=${task} onError=${onError} onNotice=${onNotice} />`}
    </section>
  `;
}
