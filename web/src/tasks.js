// The Instances panel: every task the host lets us see, with the actions
// that make sense for its kind and state. The host decides everything; the
// buttons shown here only avoid offering what it would certainly refuse.

import { html } from 'htm/preact';
import { useState } from 'preact/hooks';
import { post } from './api.js';
import { bytes, imageText, progressText } from './format.js';

/** States a task never leaves on its own (api::TaskState::is_final). */
export const FINAL = ['completed', 'failed', 'killed', 'killed_oom', 'deleted', 'rejected'];

/**
 * What a person may do to a task, as the host's Principal decides it
 * (`may_use`, `may_operate`): `use` (exec, logs, snapshots, delete) is the
 * admin's, or the owner's whatever their role (a viewer who once was a
 * user still owns their VPS); `operate` (stop, start, pause, kill) is also
 * every operator's, but never a viewer's.
 */
export function rights(me, task) {
  const own = me.user != null && task.owner === me.user;
  const use = me.role === 'admin' || own;
  const operate = me.role === 'operator' || (me.role !== 'viewer' && use);
  return { use, operate };
}

/** The buttons a task's row offers, in the order shown. */
export function actionsFor(task, me) {
  const { use, operate } = rights(me, task);
  const s = task.state;
  const out = [];
  // Being deleted: nothing left to do but wait (the row says "deleting…").
  if (task.desired === 'deleted') return out;
  if (task.spec.kind === 'vps') {
    if (s === 'running') {
      if (operate) out.push('stop', 'pause');
      if (use) out.push('snapshot', 'terminal');
    } else if (s === 'paused') {
      if (operate) out.push('resume', 'stop');
    } else if (s === 'stopped' || (FINAL.includes(s) && s !== 'deleted')) {
      // A stopped or ended VPS keeps its disk: it can start again (not a
      // rejected one: that would skip the approval), or go for good.
      if (operate && s !== 'rejected') out.push('restart');
      if (use) out.push('delete');
    } else if (s !== 'deleted' && operate) {
      // pending, pending_approval, assigning, lost: not started, or unreachable.
      out.push('kill');
    }
  } else if (!FINAL.includes(s) && operate) {
    out.push('kill');
  }
  // Requests that wait for a decision: operators and the admin decide.
  if (s === 'pending_approval' && ['admin', 'operator'].includes(me.role)) out.unshift('approve', 'reject');
  // Logs exist once the task was placed on a node.
  if (use && task.placement) out.push('logs');
  return out;
}

const LABELS = {
  stop: 'Stop',
  restart: 'Restart',
  pause: 'Pause',
  resume: 'Resume',
  kill: 'Kill',
  delete: 'Delete',
  snapshot: 'Snapshot',
  terminal: 'Terminal',
  logs: 'Logs',
  approve: 'Approve',
  reject: 'Reject',
};

// Actions that ask first, in the row itself (not window.confirm, which
// blocks the page and which a test cannot answer).
const ASKS_FIRST = ['delete', 'reject'];

/**
 * What the user asked for that has not happened yet ("stopping…"), from
 * `desired` (what the user wants) against `state` (what the node reports).
 */
export function pendingChange(task) {
  const { desired: d, state: s } = task;
  if (d === 'deleted' && s !== 'deleted') return 'deleting…';
  if (d === 'restarting') return 'restarting…';
  if (d === 'stopped' && !['stopped', 'pending', 'pending_approval', ...FINAL].includes(s)) return 'stopping…';
  if (d === 'killed' && !FINAL.includes(s)) return 'killing…';
  if (d === 'paused' && s === 'running') return 'pausing…';
  if (d === 'running' && s === 'paused') return 'resuming…';
  return null;
}

/** Cores · memory · GPUs, as reserved once placed, as asked for before. */
function resources(task) {
  const p = task.placement;
  const gpus = p ? p.gpus.length : task.spec.gpu_count;
  const mem = p ? p.memory_bytes : task.spec.memory_bytes;
  return [
    `${task.spec.cores} ${task.spec.cores === 1 ? 'core' : 'cores'}`,
    mem ? bytes(mem) : 'no mem limit',
    gpus ? `${gpus} GPU` : null,
  ]
    .filter(Boolean)
    .join(' · ');
}

/** The one line that says why a task is the way it is. */
function Why({ task }) {
  const progress = progressText(task.progress);
  const lines = [];
  if (task.notice) lines.push(html`<div class="warn">${task.notice}</div>`);
  if (progress) lines.push(html`<div>${progress}</div>`);
  if (task.message) lines.push(html`<div class=${task.state === 'failed' ? 'bad' : ''}>${task.message}</div>`);
  if (task.exit_code != null && FINAL.includes(task.state)) lines.push(html`<div class="muted">exit code ${task.exit_code}</div>`);
  // The reason says why a task waits (or where it went): worth showing
  // until it runs, and as a tooltip after.
  if (lines.length === 0 && task.reason && !['running', 'paused'].includes(task.state)) {
    lines.push(html`<div class="muted">${task.reason}</div>`);
  }
  return html`<td class="why" title=${task.reason}>${lines}</td>`;
}

function Actions({ task, me, busy, confirming, onAction, onConfirm }) {
  const [reason, setReason] = useState('');
  if (confirming === 'delete') {
    return html`
      <div class="confirm">
        <span>Delete #${task.id} with its disk and snapshots?</span>
        <button class="danger" data-test="confirm-delete" onClick=${() => onAction(task, 'delete')}>Delete</button>
        <button data-test="cancel" onClick=${() => onConfirm(null)}>Cancel</button>
      </div>
    `;
  }
  if (confirming === 'reject') {
    return html`
      <form class="confirm" onSubmit=${(e) => (e.preventDefault(), onAction(task, 'reject', { reason }))}>
        <input data-test="reject-reason" placeholder="why (its owner reads it)" value=${reason} onInput=${(e) => setReason(e.currentTarget.value)} />
        <button class="danger" type="submit" data-test="confirm-reject" disabled=${!reason.trim()}>Reject</button>
        <button type="button" data-test="cancel" onClick=${() => onConfirm(null)}>Cancel</button>
      </form>
    `;
  }
  return html`
    <div class="buttons">
      ${actionsFor(task, me).map(
        (a) => html`
          <button
            key=${a}
            data-test=${a}
            class=${['delete', 'kill', 'reject'].includes(a) ? 'danger-outline' : a === 'approve' ? 'primary' : ''}
            disabled=${busy != null}
            onClick=${() => (ASKS_FIRST.includes(a) ? onConfirm({ id: task.id, what: a }) : onAction(task, a))}
          >
            ${busy === a ? `${LABELS[a]}…` : LABELS[a]}
          </button>
        `,
      )}
    </div>
  `;
}

export function TasksPanel({ tasks, me, selected, onSelect, onTerminal, onError, onNotice, refresh }) {
  // Which task's action is under way (a button shows "Stop…"), and which
  // row asks "really delete?" ({id, what}).
  const [busy, setBusy] = useState({});
  const [confirming, setConfirming] = useState(null);
  const [showDeleted, setShowDeleted] = useState(false);

  async function onAction(task, action, body) {
    if (action === 'terminal') return onTerminal(task.id);
    if (action === 'logs') return onSelect(task.id);
    setConfirming(null);
    setBusy((b) => ({ ...b, [task.id]: action }));
    try {
      if (action === 'snapshot') {
        const snap = await post(`/api/vps/snapshots/${task.id}`, {});
        onNotice(`Snapshot ${snap.id} of #${task.id} taken (${bytes(snap.size_bytes)}).`);
      } else {
        // The others take no body (reject: the reason).
        await post(`/api/tasks/${task.id}/${action}`, body);
      }
      onError(null);
    } catch (e) {
      onError(`${LABELS[action]} #${task.id}: ${e.message}`);
    } finally {
      setBusy(({ [task.id]: _, ...rest }) => rest);
      refresh();
    }
  }

  const deleted = tasks ? tasks.filter((t) => t.state === 'deleted').length : 0;
  const shown = tasks ? tasks.filter((t) => showDeleted || t.state !== 'deleted').sort((a, b) => b.id - a.id) : [];

  return html`
    <section class="card" data-test="tasks">
      <header class="card-head">
        <h2>Instances</h2>
        ${deleted > 0 &&
        html`<label class="muted small inline">
          <input type="checkbox" checked=${showDeleted} onChange=${(e) => setShowDeleted(e.currentTarget.checked)} />
          show deleted (${deleted})
        </label>`}
      </header>
      ${tasks == null
        ? html`<p class="empty">Loading…</p>`
        : html`
            <div class="table-wrap" data-test="tasks-loaded">
              ${shown.length === 0
                ? html`<p class="empty">No instances yet${me.role === 'viewer' ? '.' : ': create a VPS above.'}</p>`
                : html`
                    <table class="tasks">
                      <thead>
                        <tr>
                          <th>ID</th><th>Kind</th><th>Owner</th><th>State</th><th>Image</th><th>Node</th>
                          <th>Resources</th><th>Status</th><th></th>
                        </tr>
                      </thead>
                      <tbody>
                        ${shown.map(
                          (t) => html`
                            <tr
                              key=${t.id}
                              data-test=${`task-${t.id}`}
                              class=${t.id === selected ? 'selected' : ''}
                            >
                              <td><button class="link strong" title="Details" onClick=${() => onSelect(t.id)}>#${t.id}</button></td>
                              <td>${t.spec.kind === 'vps' ? 'VPS' : 'task'}</td>
                              <td>${t.owner ?? html`<span class="muted">admin</span>`}</td>
                              <td class="state">
                                <span class=${`badge s-${t.state}`} data-test="state">${t.state}</span>
                                ${pendingChange(t) && html`<div class="muted small">${pendingChange(t)}</div>`}
                              </td>
                              <td class="image" title=${imageText(t.spec.image)}>${imageText(t.spec.image)}</td>
                              <td>${t.placement?.node ?? html`<span class="muted">—</span>`}</td>
                              <td class="small nowrap">${resources(t)}</td>
                              <${Why} task=${t} />
                              <td class="actions">
                                <${Actions}
                                  task=${t}
                                  me=${me}
                                  busy=${busy[t.id]}
                                  confirming=${confirming?.id === t.id ? confirming.what : null}
                                  onAction=${onAction}
                                  onConfirm=${setConfirming}
                                />
                              </td>
                            </tr>
                          `,
                        )}
                      </tbody>
                    </table>
                  `}
            </div>
          `}
    </section>
  `;
}
