// The "New VPS" form: what `rivernode vps create` asks for, minus the
// advanced flags (ports, onstart, VM images), which stay the CLI's.

import { html } from 'htm/preact';
import { useEffect, useState } from 'preact/hooks';
import { post } from './api.js';
import { bytes, parseMemory } from './format.js';

/**
 * The TaskSpec the host expects (api::TaskSpec; unknown fields are refused).
 * `image` is an externally tagged ImageSource: {"environment": "base"} or
 * {"registry": "docker.io/library/debian:12"}. A VPS's command is empty: it
 * runs its SSH server (and stays up).
 */
export function vpsSpec({ kind, image, cores, memory, gpus, sshKey }) {
  const name = image.trim();
  if (!name) throw new Error(kind === 'environment' ? 'image: choose an environment' : 'image: give a registry reference, e.g. docker.io/library/debian:12');
  const c = Number(cores);
  if (!Number.isInteger(c) || c < 1) throw new Error('cores: a whole number, at least 1');
  const g = Number(gpus);
  if (!Number.isInteger(g) || g < 0) throw new Error('GPUs: a whole number, 0 or more');
  return {
    kind: 'vps',
    command: [],
    image: { [kind]: name },
    cores: c,
    memory_bytes: parseMemory(memory),
    gpu_count: g,
    // One key per line, as in authorized_keys; comments and blanks dropped.
    ssh_keys: sshKey
      .split('\n')
      .map((l) => l.trim())
      .filter((l) => l && !l.startsWith('#')),
  };
}

export function NewVps({ environments, onCreated, onError }) {
  const envs = environments?.environments ?? [];
  const [form, setForm] = useState({
    kind: 'registry',
    image: '',
    cores: '1',
    memory: '',
    gpus: '0',
    sshKey: '',
  });
  const [kindChosen, setKindChosen] = useState(false);
  const [busy, setBusy] = useState(false);
  const [created, setCreated] = useState(null);

  // Once the environments are known, start from the cluster's default one
  // (what `vps create` uses without --image), unless the user already chose.
  useEffect(() => {
    if (kindChosen || envs.length === 0) return;
    setForm((f) => ({ ...f, kind: 'environment', image: f.image || environments.default || envs[0].name }));
  }, [environments]);

  const set = (field) => (e) => setForm((f) => ({ ...f, [field]: e.currentTarget.value }));

  async function submit(e) {
    e.preventDefault();
    let spec;
    try {
      spec = vpsSpec(form);
    } catch (err) {
      onError(err.message);
      return;
    }
    setBusy(true);
    try {
      // SubmitResponse: {id, state, reason}.
      const r = await post('/api/tasks', spec);
      setCreated(r);
      onError(null);
      onCreated(r.id);
    } catch (err) {
      onError(`Create: ${err.message}`);
    } finally {
      setBusy(false);
    }
  }

  return html`
    <section class="card">
      <header class="card-head"><h2>New VPS</h2></header>
      <form class="create" onSubmit=${submit}>
        <label>
          Image from
          <select
            data-test="image-kind"
            value=${form.kind}
            onChange=${(e) => {
              // An environment name is no registry reference, nor the other
              // way round: start the image over, from the default if any.
              const kind = e.currentTarget.value;
              setKindChosen(true);
              setForm((f) => ({ ...f, kind, image: kind === 'environment' ? environments?.default ?? '' : '' }));
            }}
          >
            <option value="environment">environment</option>
            <option value="registry">registry image</option>
          </select>
        </label>
        <label class="grow">
          ${form.kind === 'environment' ? 'Environment' : 'Image reference'}
          <input
            data-test="image"
            list=${form.kind === 'environment' ? 'rn-environments' : undefined}
            placeholder=${form.kind === 'environment' ? 'name' : 'docker.io/library/debian:12'}
            value=${form.image}
            onInput=${set('image')}
            required
          />
          <datalist id="rn-environments">
            ${envs.map((env) => html`<option key=${env.name} value=${env.name}>${bytes(env.size_bytes)}</option>`)}
          </datalist>
        </label>
        <label class="narrow">
          Cores
          <input data-test="cores" type="number" min="1" step="1" value=${form.cores} onInput=${set('cores')} />
        </label>
        <label class="narrow">
          Memory
          <input data-test="memory" placeholder="no limit" title="e.g. 512M, 4G, 1.5T (binary units)" value=${form.memory} onInput=${set('memory')} />
        </label>
        <label class="narrow">
          GPUs
          <input data-test="gpus" type="number" min="0" step="1" value=${form.gpus} onInput=${set('gpus')} />
        </label>
        <label class="wide">
          <span>SSH public key <span class="muted">(one per line; a VPS from an image without an SSH server of its own needs one)</span></span>
          <textarea data-test="ssh-key" rows="2" placeholder="ssh-ed25519 AAAA… you@laptop" value=${form.sshKey} onInput=${set('sshKey')}></textarea>
        </label>
        <div class="create-foot">
          <button class="primary" type="submit" data-test="create" disabled=${busy}>${busy ? 'Creating…' : 'Create VPS'}</button>
          ${created &&
          html`<span class="ok">
            Created VPS #<strong data-test="created">${created.id}</strong>: ${created.state}${created.reason ? ` (${created.reason})` : ''}
          </span>`}
        </div>
      </form>
    </section>
  `;
}
