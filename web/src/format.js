// Turning the host's numbers into text people read, and the one thing people
// type that needs parsing (memory sizes). Kept free of Preact so each helper
// is easy to test in isolation.

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 4294967296 -> "4 GiB", 1610612736 -> "1.5 GiB" (binary units, like the CLI). */
export function bytes(n) {
  if (n == null) return '—';
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  // One decimal below 10 (1.5 GiB), none above (512 MiB); never "4.0".
  const text = v < 10 && i > 0 ? v.toFixed(1).replace(/\.0$/, '') : Math.round(v).toString();
  return `${text} ${UNITS[i]}`;
}

/**
 * A memory size as the CLI accepts it (`api::parse_memory_size`): a number
 * with a unit K, M, G or T, optionally followed by i/iB/B, binary in every
 * case ("512M" = 512 MiB), fractions allowed ("1.5G"). A bare number is
 * refused because it is ambiguous. Empty input means "no limit" (null).
 * Throws an Error whose message says what to write instead.
 */
export function parseMemory(input) {
  const s = input.trim();
  if (s === '') return null;
  const m = /^(\d+(?:\.\d+)?)\s*([A-Za-z]*)$/.exec(s);
  if (!m) throw new Error(`memory: "${s}" is not a size; write a number with a unit, e.g. 512M, 8G, 1.5T`);
  const unit = m[2].replace(/iB$|i$|B$/, '');
  const shift = { k: 10, m: 20, g: 30, t: 40 }[unit.toLowerCase()];
  if (unit === '') throw new Error(`memory: "${s}" has no unit; write ${s}M or ${s}G`);
  if (shift === undefined) throw new Error(`memory: unknown unit "${m[2]}" (use K, M, G or T)`);
  const value = Number(m[1]) * 2 ** shift;
  if (!Number.isFinite(value) || value < 1 || value > Number.MAX_SAFE_INTEGER) {
    throw new Error(`memory: "${s}" is out of range`);
  }
  return Math.round(value);
}

/** Milliseconds since the epoch -> "12 s ago", "3 min ago", "2 h ago", or a date. */
export function ago(unixMs, now = Date.now()) {
  if (!unixMs) return '—';
  const s = Math.max(0, Math.round((now - unixMs) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(unixMs).toLocaleString();
}

/** Milliseconds since the epoch -> local date and time. */
export function when(unixMs) {
  return unixMs ? new Date(unixMs).toLocaleString() : '—';
}

/**
 * An ImageSource as the host serialises it (externally tagged, snake_case):
 * {"environment":"base"}, {"registry":"docker.io/library/debian:12"},
 * {"snapshot":{"vps":3,"snapshot":"..."}}, {"vm_image":"ubuntu"}.
 */
export function imageText(image) {
  if (!image || typeof image !== 'object') return String(image ?? '—');
  if ('environment' in image) return `env ${image.environment}`;
  if ('registry' in image) return image.registry;
  if ('snapshot' in image) return `snapshot ${image.snapshot.snapshot} of #${image.snapshot.vps}`;
  if ('vm_image' in image) return `VM ${image.vm_image}`;
  return JSON.stringify(image);
}

/** "pulling docker.io/x 45%" from a TaskProgress, or null. */
export function progressText(p) {
  if (!p) return null;
  const pct = p.total_bytes > 0 ? ` ${Math.floor((100 * p.done_bytes) / p.total_bytes)}%` : '';
  return `${p.phase} ${p.what}${pct}`;
}

/** Removes terminal colour and cursor escapes from log text (a <pre> shows them as junk). */
export function stripAnsi(text) {
  // CSI sequences (colours, cursor moves) and OSC sequences (window titles).
  // eslint-disable-next-line no-control-regex
  return text.replace(/\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)/g, '');
}
