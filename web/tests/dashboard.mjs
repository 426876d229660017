// End-to-end check of the web dashboard against a running host, in the
// system's Chromium (playwright-core: no browser download).
//
//   RIVERNODE_URL  the host, e.g. http://127.0.0.1:8000
//   ADMIN_TOKEN    the admin's token
//   USER_TOKEN     user "ann"'s token
//   OTHER_TOKEN    user "bob"'s token (not needed by these steps)
//   OTHER_TASK     the id of bob's running VPS
//   IMAGE_KIND     environment | registry  (the create form's image source)
//   IMAGE          the environment name or registry reference
//   SSH_KEY        a public key for the new VPS (optional; an image without
//                  an SSH server of its own needs a key or a password)
//   SCREENSHOTS    a directory for the PNGs (default ./dashboard-screenshots)
//   CHROMIUM       the browser (default /usr/bin/chromium)
//
// Prints "dashboard: ok" and exits 0, or says what did not match, saves
// failure.png, prints the page's console errors and exits 1.

import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { chromium } from 'playwright-core';

function need(name) {
  const v = process.env[name];
  if (!v) {
    console.error(`dashboard: set ${name} (see the top of ${process.argv[1]})`);
    process.exit(1);
  }
  return v;
}

const URL = need('RIVERNODE_URL');
const ADMIN_TOKEN = need('ADMIN_TOKEN');
const USER_TOKEN = need('USER_TOKEN');
const OTHER_TASK = need('OTHER_TASK');
const IMAGE_KIND = need('IMAGE_KIND');
const IMAGE = need('IMAGE');
const SSH_KEY = process.env.SSH_KEY || '';
const SHOTS = resolve(process.env.SCREENSHOTS || 'dashboard-screenshots');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Starting a container can take a while (an image pull, an import).
const RUNNING_TIMEOUT = 180_000;
const STATE_TIMEOUT = 120_000;
const UI_TIMEOUT = 30_000;
// States a task never leaves on its own (api::TaskState::is_final).
const FINAL = ['completed', 'failed', 'killed', 'killed_oom', 'deleted', 'rejected'];

const consoleErrors = [];
const t = (name) => `[data-test="${name}"]`;

function log(text) {
  console.log(`dashboard: ${text}`);
}

async function shot(page, name, fullPage = false) {
  await page.screenshot({ path: join(SHOTS, name), fullPage });
}

/** Text of the error banner, if one shows (for failure messages). */
async function banner(page) {
  const b = page.locator(t('error'));
  return (await b.count()) ? ` — the page says: ${(await b.first().innerText()).trim()}` : '';
}

/** The state text of task `id`'s row, or null while there is no such row. */
async function stateOf(page, id) {
  const row = page.locator(t(`task-${id}`));
  if ((await row.count()) === 0) return null;
  const text = await row.locator(t('state')).textContent({ timeout: 5000 }).catch(() => null);
  return text == null ? null : text.trim();
}

/**
 * Waits until `accept(state)` holds for task `id`'s row (state null: no
 * row). Fails at once on a state in `failOn`, else after `timeout` ms,
 * naming the last state seen and why the page says it is so.
 */
async function waitForState(page, id, what, accept, timeout, failOn = []) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    last = await stateOf(page, id);
    if (accept(last)) return last;
    if (failOn.includes(last) || Date.now() > deadline) break;
    await page.waitForTimeout(500);
  }
  const why = await page
    .locator(`${t(`task-${id}`)} td.why`)
    .innerText({ timeout: 2000 })
    .catch(() => '');
  throw new Error(
    `task ${id}: expected ${what}, but its state is ${last ?? '(no row)'}` +
      `${why.trim() ? ` (${why.trim()})` : ''}${Date.now() > deadline ? ` after ${timeout / 1000} s` : ''}${await banner(page)}`,
  );
}

async function signIn(page, token, expected) {
  await page.locator(t('token')).fill(token);
  await page.locator(t('sign-in')).click();
  const who = page.locator(t('whoami'));
  try {
    await who.waitFor({ timeout: UI_TIMEOUT });
  } catch {
    throw new Error(`signing in as ${expected}: no "signed in as" label${await banner(page)}`);
  }
  const name = (await who.innerText()).trim();
  if (name !== expected) throw new Error(`signed in as ${JSON.stringify(name)}, expected ${JSON.stringify(expected)}`);
  // The first answer of /api/tasks is on the page.
  await page.locator(t('tasks-loaded')).waitFor({ timeout: UI_TIMEOUT });
}

/** The terminal's lines, from xterm's buffer (the page's window.__rnTerm hook). */
function terminalLines(page) {
  return page.evaluate(() => (window.__rnTerm ? window.__rnTerm.lines() : null));
}

async function run(page) {
  // 1. Sign in as ann.
  await page.goto(URL);
  await page.locator(t('token')).waitFor({ timeout: UI_TIMEOUT });
  await shot(page, 'signin.png');
  await signIn(page, USER_TOKEN, 'ann');
  log('signed in as ann');

  // 2. Bob's VPS is not ann's to see.
  if ((await page.locator(t(`task-${OTHER_TASK}`)).count()) !== 0) {
    throw new Error(`ann sees bob's task ${OTHER_TASK}`);
  }
  log(`bob's task ${OTHER_TASK} is hidden from ann`);

  // 3. Create a VPS and wait for it to run.
  await page.locator(t('image-kind')).selectOption(IMAGE_KIND);
  await page.locator(t('image')).fill(IMAGE);
  await page.locator(t('cores')).fill('1');
  await page.locator(t('memory')).fill('256M');
  await page.locator(t('gpus')).fill('0');
  if (SSH_KEY) await page.locator(t('ssh-key')).fill(SSH_KEY);
  await page.locator(t('create')).click();
  const created = page.locator(t('created'));
  try {
    await created.waitFor({ timeout: UI_TIMEOUT });
  } catch {
    throw new Error(`creating a VPS from ${IMAGE_KIND} ${IMAGE}: no id shown${await banner(page)}`);
  }
  const id = (await created.innerText()).trim();
  if (!/^\d+$/.test(id)) throw new Error(`created shows ${JSON.stringify(id)}, not a task id`);
  log(`created VPS ${id}`);
  await waitForState(page, id, 'running', (s) => s === 'running', RUNNING_TIMEOUT, FINAL);
  log(`VPS ${id} is running`);
  await shot(page, 'instances.png');

  // 4. A terminal: `echo hi` prints a line that is exactly "hi".
  const row = page.locator(t(`task-${id}`));
  await row.locator(t('terminal')).click();
  const xterm = page.locator(t('xterm'));
  await xterm.waitFor({ timeout: UI_TIMEOUT });
  await page
    .waitForFunction(() => document.querySelector('[data-test="terminal-status"]')?.textContent === 'connected', null, {
      timeout: UI_TIMEOUT,
    })
    .catch(async () => {
      const status = await page.locator(t('terminal-status')).innerText().catch(() => '?');
      const lines = ((await terminalLines(page)) ?? []).filter((l) => l.trim());
      throw new Error(`the terminal did not connect (${status}): ${lines.join(' | ')}`);
    });
  await xterm.click();
  await page.keyboard.type('echo hi');
  await page.keyboard.press('Enter');
  try {
    await page.waitForFunction(
      () => (window.__rnTerm ? window.__rnTerm.lines().some((l) => l.trim() === 'hi') : false),
      null,
      { timeout: UI_TIMEOUT, polling: 250 },
    );
  } catch {
    const lines = ((await terminalLines(page)) ?? []).filter((l) => l.trim());
    throw new Error(`no line "hi" in the terminal after echo hi; it shows:\n${lines.join('\n')}`);
  }
  log('the terminal answered echo hi');
  await shot(page, 'terminal.png');
  await page.locator(t('close-terminal')).click();
  await xterm.waitFor({ state: 'detached', timeout: UI_TIMEOUT });

  // 5. Its logs, briefly.
  await row.locator(t('logs')).click();
  await page.locator(t('log-view')).waitFor({ timeout: UI_TIMEOUT });
  await page.waitForTimeout(1500);
  await shot(page, 'logs.png');
  await page.locator(t('close-detail')).click();

  // 6. Stop, then delete (with the inline confirmation).
  await row.locator(t('stop')).click();
  await waitForState(page, id, 'stopped', (s) => s === 'stopped', STATE_TIMEOUT, FINAL);
  log(`VPS ${id} stopped`);
  await row.locator(t('delete')).click();
  await row.locator(t('confirm-delete')).click();
  // A deleted VPS leaves the list (or shows an end state where it stays).
  const after = await waitForState(
    page,
    id,
    'to be deleted (gone from the list, or an end state)',
    (s) => s === null || FINAL.includes(s),
    STATE_TIMEOUT,
  );
  log(`VPS ${id} deleted (${after ?? 'gone from the list'})`);

  // 7. The admin sees the nodes and bob's VPS.
  await page.locator(t('sign-out')).click();
  await page.locator(t('token')).waitFor({ timeout: UI_TIMEOUT });
  await signIn(page, ADMIN_TOKEN, 'admin');
  const nodes = page.locator(`${t('nodes')} tbody tr`);
  await nodes
    .first()
    .waitFor({ timeout: UI_TIMEOUT })
    .catch(async () => {
      throw new Error(`the admin sees no node in the Nodes panel${await banner(page)}`);
    });
  await page
    .locator(t(`task-${OTHER_TASK}`))
    .waitFor({ timeout: UI_TIMEOUT })
    .catch(() => {
      throw new Error(`the admin does not see bob's task ${OTHER_TASK}`);
    });
  log(`the admin sees ${await nodes.count()} node(s) and bob's task ${OTHER_TASK}`);
  await shot(page, 'nodes.png', true);
}

async function main() {
  await mkdir(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(15_000);
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(`uncaught: ${e.message}`));
  try {
    await run(page);
    // A script error, or something the Content-Security-Policy refused,
    // is a failure even where the steps passed (a failed fetch the page
    // shows, such as a 404 for a log not written yet, is not).
    const broken = consoleErrors.filter((e) => e.startsWith('uncaught:') || /Content Security Policy|Refused to/.test(e));
    if (broken.length) throw new Error(`the page logged errors:\n  ${broken.join('\n  ')}`);
    log('ok');
  } catch (e) {
    console.error(`dashboard: FAILED: ${e.message}`);
    await shot(page, 'failure.png', true).catch((err) => console.error(`dashboard: no failure.png: ${err.message}`));
    if (consoleErrors.length) console.error(`dashboard: the page's console errors:\n  ${consoleErrors.join('\n  ')}`);
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(`dashboard: ${e.message}`);
  process.exit(1);
});
