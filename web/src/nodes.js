// The Nodes panel: what each machine has (inventory) and how busy it is
// (its last heartbeat's usage, and NVML's GPU readings when it has them).
// Only people who may read the cluster see it; a user's /api/nodes is a 403
// and the panel is simply left out.

import { html } from 'htm/preact';
import { ago, bytes } from './format.js';

function gpuName(g) {
  if (g.name) return g.name;
  const hex = (n) => n.toString(16).padStart(4, '0');
  return `${g.vendor_name ?? 'GPU'} ${hex(g.vendor_id)}:${hex(g.device_id)}`;
}

/** One GPU: its model, then NVML's reading and the instance holding it, when known. */
function Gpu({ gpu, reading, holder }) {
  const parts = [];
  if (reading) {
    parts.push(`${reading.utilisation_percent}%`);
    parts.push(bytes(reading.memory_used_bytes));
    if (reading.temperature_celsius != null) parts.push(`${reading.temperature_celsius} °C`);
    if (reading.power_milliwatts != null) parts.push(`${Math.round(reading.power_milliwatts / 1000)} W`);
  }
  return html`
    <li class="gpu" title=${`${gpu.address}${gpu.uuid ? ` ${gpu.uuid}` : ''}`}>
      <span class="gpu-name">${gpuName(gpu)}</span>
      ${parts.length > 0 && html`<span class="gpu-reading">${parts.join(' · ')}</span>`}
      ${holder != null && html`<span class="chip">#${holder}</span>`}
    </li>
  `;
}

function NodeRow({ node }) {
  const inv = node.inventory;
  const usage = node.usage;
  const readings = new Map((usage?.gpus ?? []).map((r) => [r.address, r]));
  const holders = node.gpu_holders ?? {};
  const memUsed = usage ? inv.memory_total_bytes - usage.memory_available_bytes : null;
  return html`
    <tr data-test=${`node-${node.name}`}>
      <td>
        <div class="strong">${node.name}</div>
        <div class="muted small">${inv.hostname !== node.name ? `${inv.hostname} · ` : ''}v${node.version}</div>
      </td>
      <td>
        <span class=${`badge s-${node.state}`} data-test="state">${node.state}</span>
        ${node.degraded && html`<div class="why warn small">${node.degraded}</div>`}
      </td>
      <td class="num">
        ${inv.cpus.length}
        <div class="muted small">
          ${[inv.numa_nodes.length > 1 ? `${inv.numa_nodes.length} NUMA` : null, usage ? `${Math.round(usage.cpu_percent)}% busy` : null]
            .filter(Boolean)
            .join(' · ')}
        </div>
      </td>
      <td class="num">
        ${bytes(inv.memory_total_bytes)}
        ${memUsed != null && html`<div class="muted small">${bytes(memUsed)} used</div>`}
      </td>
      <td>
        ${inv.gpus.length === 0
          ? html`<span class="muted">none</span>`
          : html`<ul class="gpus">
              ${inv.gpus.map(
                (g) => html`<${Gpu} key=${g.address} gpu=${g} reading=${readings.get(g.address)} holder=${holders[g.address]} />`,
              )}
            </ul>`}
      </td>
      <td class="muted small">${ago(node.last_heartbeat_unix_ms)}</td>
    </tr>
  `;
}

export function NodesPanel({ nodes }) {
  return html`
    <section class="card" data-test="nodes">
      <header class="card-head">
        <h2>Nodes</h2>
        <span class="muted small">${nodes.length} registered</span>
      </header>
      ${nodes.length === 0
        ? html`<p class="empty">No node has registered yet. Start <code>rivernode runner --host-url …</code> on a machine.</p>`
        : html`
            <div class="table-wrap">
              <table>
                <thead>
                  <tr><th>Name</th><th>State</th><th class="num">CPUs</th><th class="num">Memory</th><th>GPUs</th><th>Heartbeat</th></tr>
                </thead>
                <tbody>
                  ${nodes.map((n) => html`<${NodeRow} key=${n.name} node=${n} />`)}
                </tbody>
              </table>
            </div>
          `}
    </section>
  `;
}
