// Browser end-to-end tests of the web UI: headless Debian Chromium driven by
// playwright-core, run by node's built-in test runner. Started by ./run.sh, which runs the
// server and passes WB_URL and WB_DATA_DIR.
//
// The scenario of the issue, one named test per step: register → submit a demo job →
// watch its progress reach 100 % live → subscribe through the fake Stripe checkout → plan
// shows active → revoke a session → admin retries a dead job; plus every page rendered,
// screenshotted and checked for labels, focus and CSP violations.
//
// Steps that need an endpoint the server does not have yet (its answer is 404 "no API
// route") are skipped with the endpoint named; E2E_STRICT=1 turns those skips into
// failures. Only register and refresh have a FALLBACK for such servers: the browser still
// runs the real UI flow, but the missing endpoint is answered by this test (a user and
// session seeded into SQLite with seed.py, an HS256 access token minted with the server's
// key). The fallback is used only while the server itself answers 404 for the route.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = dirname(fileURLToPath(import.meta.url));
const BASE = process.env.WB_URL;
const DATA = process.env.WB_DATA_DIR;
const ARTIFACTS = process.env.E2E_ARTIFACTS || join(HERE, 'artifacts');
const STRICT = process.env.E2E_STRICT === '1';
assert.ok(BASE && DATA, 'run through tests/e2e/run.sh (WB_URL and WB_DATA_DIR are needed)');
mkdirSync(ARTIFACTS, { recursive: true });

const EMAIL = `ada+${Date.now()}@example.com`;
const PASSWORD = 'correct horse battery';
const fallbacks = new Set();
const problems = []; // uncaught page errors and CSP violations
let browser;
let context;
let page;
let shotNo = 0;
let apiToken = null; // a bearer token of the registered user for API checks from node
const missingCache = new Map();

// ---------------------------------------------------------------- helpers

async function http(method, path, { body, token, headers = {} } = {}) {
  const h = { ...headers };
  if (body !== undefined) h['Content-Type'] = 'application/json';
  if (token) h.Authorization = `Bearer ${token}`;
  const res = await fetch(BASE + path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, json, text };
}

const noRoute = (r) => r.status === 404 && /no API route/.test(r.text);

/** True when the server has no such route yet (it answers 404 "no API route"). */
async function missing(method, path) {
  const key = `${method} ${path}`;
  if (!missingCache.has(key)) {
    missingCache.set(key, noRoute(await http(method, path, method === 'GET' ? {} : { body: {} })));
  }
  return missingCache.get(key);
}

/** Skips the test (or fails it under E2E_STRICT=1) when any route is missing. */
async function needs(t, ...routes) {
  const absent = [];
  for (const r of routes) {
    const [m, p] = r.split(' ');
    if (await missing(m, p)) absent.push(r);
  }
  if (!absent.length) return false;
  const why = `needs ${absent.join(', ')} (not on this server yet)`;
  if (STRICT) assert.fail(why);
  t.skip(why);
  return true;
}

async function until(fn, { timeout = 15_000, what = 'condition', every = 100 } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** The refresh token the UI keeps (IndexedDB `warpbase`/`auth`), or null. */
function storedRefresh(p = page) {
  return p.evaluate(() => new Promise((resolve, reject) => {
    const req = indexedDB.open('warpbase', 1);
    req.onupgradeneeded = () => req.result.createObjectStore('auth');
    req.onerror = () => reject(req.error);
    req.onsuccess = () => {
      const get = req.result.transaction('auth').objectStore('auth').get('warpbase.refresh_token');
      get.onsuccess = () => { req.result.close(); resolve(get.result ?? null); };
      get.onerror = () => reject(get.error);
    };
  }));
}

async function noStoredRefresh(what) {
  await until(async () => (await storedRefresh()) === null, { what });
}

async function shot(name, p = page) {
  shotNo += 1;
  const file = join(ARTIFACTS, `${String(shotNo).padStart(2, '0')}-${name}.png`);
  await p.screenshot({ path: file, fullPage: true });
  return file;
}

async function go(hash) {
  const target = `${BASE}/#/${hash}`;
  // Same URL: goto would be a no-op and leave a stale page; go through another route so
  // the view renders afresh (a reload would also work but restarts the whole app).
  if (page.url() === target) {
    // A detour that renders without redirecting (public pages to public pages).
    const detour = hash === 'register' ? 'signin'
      : ['signin', 'forgot'].includes(hash) ? 'register'
        : hash === 'billing' ? 'account' : 'billing';
    await page.goto(`${BASE}/#/${detour}`);
    await page.locator('main#main h1').first().waitFor();
  }
  await page.goto(target);
  await page.locator('main#main h1').first().waitFor();
}

/** Every visible form control has an accessible name; the page has one h1; focus is on main. */
async function checkA11y(where) {
  const r = await page.evaluate(() => {
    const unlabeled = [...document.querySelectorAll('input, select, textarea')]
      .filter((el) => el.type !== 'hidden' && el.offsetParent !== null)
      .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
      .map((el) => el.name || el.id || el.outerHTML.slice(0, 60));
    const unnamedButtons = [...document.querySelectorAll('button, a[href]')]
      .filter((el) => el.offsetParent !== null && !(el.textContent.trim() || el.getAttribute('aria-label')))
      .map((el) => el.outerHTML.slice(0, 60));
    return {
      unlabeled, unnamedButtons,
      h1: document.querySelectorAll('h1').length,
      focus: document.activeElement?.id || document.activeElement?.tagName,
      overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    };
  });
  assert.deepEqual(r.unlabeled, [], `${where}: form controls without a label`);
  assert.deepEqual(r.unnamedButtons, [], `${where}: buttons/links without a name`);
  assert.equal(r.h1, 1, `${where}: exactly one h1`);
  assert.ok(r.overflow <= 0, `${where}: no horizontal scrolling (overflow ${r.overflow}px)`);
  return r;
}

// ------------------------------------------------- fallback for servers without auth routes

function mintAccess(sub, sid) {
  const key = readFileSync(join(DATA, 'secrets', 'jwt.key'), 'utf8').trim();
  const now = Math.floor(Date.now() / 1000);
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const unsigned = `${enc({ alg: 'HS256', typ: 'JWT' })}.${enc({ sub, sid, ver: 0, iat: now, exp: now + 900 })}`;
  return `${unsigned}.${createHmac('sha256', key).update(unsigned).digest('base64url')}`;
}

const seeded = new Map(); // refresh token → {sub, sid}
const rotatedAway = new Set();
let seededUsers = 0;

async function pairFor(sub, sid, refresh) {
  const access = mintAccess(sub, sid);
  const me = await http('GET', '/api/v1/me', { token: access });
  assert.equal(me.status, 200, `seeded token works on /me: ${me.text}`);
  seeded.set(refresh, { sub, sid });
  return {
    access_token: access, token_type: 'Bearer', expires_in: 900,
    refresh_token: refresh, refresh_expires_in: 604800, user: me.json,
  };
}

function seedUser(email, name) {
  seededUsers += 1;
  const out = execFileSync('python3', [join(HERE, 'seed.py'), join(DATA, 'warpbase.db'), email,
    seededUsers === 1 ? 'admin' : 'user', name || ''], { encoding: 'utf8' });
  return JSON.parse(out);
}

const STUBS = {
  async '/api/v1/auth/register'(req) {
    const { email, name } = JSON.parse(req.postData() || '{}');
    const s = seedUser(email, name);
    apiToken = mintAccess(s.user_id, s.session_id);
    return { status: 201, body: await pairFor(s.user_id, s.session_id, s.refresh_token) };
  },
  async '/api/v1/auth/refresh'(req) {
    const { refresh_token: rt } = JSON.parse(req.postData() || '{}');
    if (rotatedAway.has(rt)) return { status: 401, body: { code: 'refresh_reused', status: 401, title: 'Unauthorized', detail: 'refresh token reused' } };
    const who = seeded.get(rt);
    if (!who) return { status: 401, body: { code: 'unauthorized', status: 401, title: 'Unauthorized', detail: 'unknown refresh token' } };
    seeded.delete(rt);
    rotatedAway.add(rt);
    return { status: 200, body: await pairFor(who.sub, who.sid, randomBytes(32).toString('base64url')) };
  },
};

async function installFallbacks(ctx) {
  for (const [path, stub] of Object.entries(STUBS)) {
    await ctx.route(`${BASE}${path}`, async (route) => {
      const real = await route.fetch();
      const text = await real.text();
      if (!(real.status() === 404 && /no API route/.test(text))) {
        return route.fulfill({ response: real, body: text });
      }
      fallbacks.add(path);
      const { status, body } = await stub(route.request());
      return route.fulfill({
        status, contentType: status < 300 ? 'application/json' : 'application/problem+json', body: JSON.stringify(body),
      });
    });
  }
}

// ---------------------------------------------------------------- setup

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--no-first-run', '--disable-sync', '--disable-quic'],
  });
  context = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  await installFallbacks(context);
  page = await context.newPage();
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error' && /Content Security Policy|Refused to/.test(m.text())) problems.push(`CSP: ${m.text()}`);
  });
});

after(async () => {
  await browser?.close();
  if (fallbacks.size) console.log(`# FALLBACK used for: ${[...fallbacks].join(', ')} (the server has no such route yet)`);
});

// ---------------------------------------------------------------- tests

test('static assets: JS modules with a JavaScript MIME type, ETag + no-cache, strict CSP, SPA fallback', async () => {
  const js = await fetch(`${BASE}/js/app.js`);
  assert.match(js.headers.get('content-type'), /^(text|application)\/javascript/);
  const etag = js.headers.get('etag');
  assert.ok(etag, 'ETag');
  assert.equal(js.headers.get('cache-control'), 'no-cache');
  const again = await fetch(`${BASE}/js/app.js`, { headers: { 'If-None-Match': etag } });
  assert.equal(again.status, 304);
  const css = await fetch(`${BASE}/css/app.css`);
  assert.match(css.headers.get('content-type'), /^text\/css/);
  const svg = await fetch(`${BASE}/favicon.svg`);
  assert.match(svg.headers.get('content-type'), /^image\/svg\+xml/);
  const shell = await fetch(`${BASE}/some/client/route`);
  assert.equal(shell.status, 200);
  assert.match(shell.headers.get('content-type'), /^text\/html/);
  const csp = shell.headers.get('content-security-policy');
  assert.match(csp, /default-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline/);
  const html = await shell.text();
  assert.doesNotMatch(html, /<script>|<style|style=/, 'no inline script or style in index.html');
});

test('public pages render: sign in, register, forgot, reset, verify, OAuth completion and error', async () => {
  await go('signin');
  assert.equal(await page.locator('h1').textContent(), 'Sign in');
  await checkA11y('sign-in');
  await shot('signin');

  await page.getByRole('link', { name: 'Create an account' }).click();
  await page.locator('h1', { hasText: 'Create your account' }).waitFor();
  await checkA11y('register');
  await shot('register');

  await go('forgot');
  await checkA11y('forgot');
  await page.getByLabel('Email').fill('nobody@example.com');
  await page.getByRole('button', { name: 'Send reset link' }).click();
  await page.locator('.form-errors .notice').waitFor();
  await shot('forgot-submitted');

  await go('reset?token=bogus');
  await checkA11y('reset');
  await page.getByLabel('New password', { exact: true }).fill('another password 1');
  await page.getByLabel('Repeat the new password').fill('another password 2');
  await page.getByRole('button', { name: 'Set new password' }).click();
  await page.getByText('The two passwords do not match.').waitFor();
  await shot('reset-mismatch');

  await go('verify?token=bogus');
  await page.locator('.notice.error').waitFor();
  await shot('verify-bad-token');

  await go('auth/error?code=account_exists');
  await page.getByText('An account with this email already exists').waitFor();
  await shot('oauth-error');

  await go('auth/complete?code=bogus');
  await page.locator('.notice.error').waitFor();
  assert.equal(new URL(page.url()).hash, '#/auth/complete', 'the one-time code is removed from the address bar');
  await shot('oauth-complete-bad-code');
});

// No account is admin for being first: the server logs a one-time setup token at start
// while no admin exists, and POST /api/v1/admin/claim with it makes the caller admin.
async function claimAdmin(token) {
  const me = await http('GET', '/api/v1/me', { token });
  if (me.json?.role === 'admin') return; // the seeded fallback user already is
  const lines = readFileSync(process.env.WB_LOG || '/dev/null', 'utf8').split('\n');
  let setup = null;
  for (const line of lines) {
    if (!line.includes('setup_token')) continue;
    try {
      const j = JSON.parse(line);
      setup = j.setup_token ?? j.fields?.setup_token ?? setup;
    } catch { /* not a JSON line */ }
  }
  assert.ok(setup, 'the start-up log has an admin setup token');
  const r = await http('POST', '/api/v1/admin/claim', { token, body: { token: setup } });
  assert.equal(r.status, 204, r.text);
}

test('step 1: register a new account and claim admin with the setup token', async () => {
  await go('register');
  await page.getByLabel('Name (optional)').fill('Ada Lovelace');
  await page.getByLabel('Email').fill(EMAIL);
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Create account' }).click();
  await page.locator('h1', { hasText: 'Jobs' }).waitFor();
  assert.equal(await page.locator('.who .email').textContent(), EMAIL);
  if (!apiToken) {
    // Real auth: a token of our own for API checks (also a second session to revoke later).
    const r = await http('POST', '/api/v1/auth/login', { body: { email: EMAIL, password: PASSWORD } });
    assert.equal(r.status, 200, r.text);
    apiToken = r.json.access_token;
  }
  await claimAdmin(apiToken);
  await page.reload();
  await page.locator('h1', { hasText: 'Jobs' }).waitFor();
  await page.getByRole('link', { name: 'Admin' }).waitFor();
  await checkA11y('dashboard');
  await page.locator('.empty').waitFor();
  await shot('dashboard-empty');
});

test('reload keeps the session: refresh token in IndexedDB, access token only in memory', async () => {
  const stored = await storedRefresh();
  assert.ok(stored && !stored.startsWith('eyJ'), 'an opaque refresh token is stored');
  await page.reload();
  await page.locator('h1', { hasText: 'Jobs' }).waitFor();
  const after = await storedRefresh();
  assert.ok(after && after !== stored, 'the refresh token rotated');
  const web = await page.evaluate(() => JSON.stringify({ local: { ...localStorage }, session: { ...sessionStorage } }));
  assert.doesNotMatch(web, /eyJ[\w-]+\.eyJ/, 'no JWT access token in web storage');
  assert.doesNotMatch(web, /refresh_token/, 'the refresh token is not in localStorage or sessionStorage');
});

test('two tabs restoring at once share one refresh lock and never trip reuse detection', async () => {
  const refreshes = [];
  const onReq = (r) => { if (r.url().endsWith('/api/v1/auth/refresh')) refreshes.push(r.url()); };
  // What each refresh got, for the failure message: a reuse shows up as 401 refresh_reused.
  const answers = [];
  const onRes = (r) => {
    if (!r.url().endsWith('/api/v1/auth/refresh')) return;
    r.text().then((b) => answers.push(`${r.status()} ${r.ok() ? '' : b}`), () => answers.push(`${r.status()}`));
  };
  context.on('request', onReq);
  context.on('response', onRes);
  const page2 = await context.newPage();
  try {
    await Promise.all([page.reload(), page2.goto(`${BASE}/#/`)]);
    for (const p of [page, page2]) {
      await p.locator('h1', { hasText: 'Jobs' }).waitFor().catch((e) => {
        throw new Error(`${e.message}\nrefresh answers: ${JSON.stringify(answers)}`);
      });
    }
    assert.equal(await page2.locator('.who .email').textContent(), EMAIL);
    assert.ok(refreshes.length >= 1 && refreshes.length <= 2, `refreshes: ${refreshes.length}`);
    // Both tabs stay usable: each can still call the API after the rotation(s).
    await page2.getByRole('link', { name: 'Billing' }).click();
    await page2.locator('article.plan[data-plan="pro"]').waitFor();
    await page.getByRole('link', { name: 'Billing' }).click();
    await page.locator('article.plan[data-plan="pro"]').waitFor();
  } finally {
    context.off('request', onReq);
    context.off('response', onRes);
    await page2.close();
  }
  await go('');
});

test('step 2: submit a demo job and watch its progress bar reach 100% live over SSE', async () => {
  await page.locator('.live[data-state="connected"]').waitFor();
  await page.getByLabel('Steps').fill('12');
  await page.getByLabel('Milliseconds per step').fill('300');
  await page.getByRole('button', { name: 'Run demo job' }).click();
  await page.getByText(/queued\.$/).waitFor();
  const id = await page.locator('li.job').first().getAttribute('data-job-id');
  assert.ok(id);
  // Record every value the bar shows, in the page, while the job runs.
  const watching = page.evaluate((jobId) => new Promise((resolve) => {
    const values = [];
    const t0 = Date.now();
    const tick = () => {
      const li = document.querySelector(`li.job[data-job-id="${jobId}"]`);
      const v = li?.querySelector('progress')?.value;
      if (v !== undefined && values[values.length - 1] !== v) values.push(v);
      if (li?.dataset.status === 'succeeded' || Date.now() - t0 > 30_000) {
        resolve({ values, status: li?.dataset.status, text: li?.querySelector('.pct')?.textContent });
      } else setTimeout(tick, 15);
    };
    tick();
  }), id);
  await page.waitForFunction((jobId) => {
    const v = document.querySelector(`li.job[data-job-id="${jobId}"] progress`)?.value;
    return v > 25 && v < 90;
  }, id, { timeout: 20_000 });
  await shot('dashboard-job-running');
  const seen = await watching;
  assert.equal(seen.status, 'succeeded', `job ended ${seen.status}; bar showed ${seen.values}`);
  assert.equal(seen.values.at(-1), 100);
  assert.equal(seen.text, '100%');
  const middle = seen.values.filter((v) => v > 0 && v < 100);
  assert.ok(middle.length >= 3, `the bar moved through intermediate values live: ${seen.values}`);
  assert.deepEqual([...middle].sort((a, b) => a - b), middle, 'progress only goes up');
  await page.locator(`li.job[data-job-id="${id}"] .badge`, { hasText: 'Succeeded' }).waitFor();
  assert.equal(await page.locator(`li.job[data-job-id="${id}"]`).count(), 1, 'the job is listed once');
  assert.ok(await page.getByRole('button', { name: 'Load older jobs' }).isHidden(), 'no "load more" without a cursor');
  await shot('dashboard-job-done');

  // The result view of the finished job.
  await page.locator(`li.job[data-job-id="${id}"]`).getByRole('link', { name: 'View result' }).click();
  await page.locator('h1', { hasText: 'demo job' }).waitFor();
  await page.locator('table caption', { hasText: 'Attempts' }).waitFor();
  await checkA11y('job page');
  await shot('job-result');
});

/** Restarts the server (SIGTERM, same command line): every live SSE connection drops. */
async function restartServer() {
  const pidfile = process.env.WB_PIDFILE;
  const cmd = (process.env.WB_SERVER_CMD || '').split('\n').filter(Boolean);
  assert.ok(pidfile && cmd.length, 'run.sh passes WB_PIDFILE and WB_SERVER_CMD');
  process.kill(Number(readFileSync(pidfile, 'utf8').trim()), 'SIGTERM');
  await until(async () => {
    try { await fetch(`${BASE}/healthz`); return false; } catch { return true; }
  }, { timeout: 30_000, what: 'the server to stop' });
  // The old process closes its listener before it has released the data dir: start the
  // new one again while it exits with "already running".
  const log = openSync(process.env.WB_LOG || '/dev/null', 'a');
  const end = Date.now() + 30_000;
  for (;;) {
    const child = spawn(cmd[0], cmd.slice(1), { detached: true, stdio: ['ignore', log, log] });
    let exited = false;
    child.on('exit', () => { exited = true; });
    child.unref();
    writeFileSync(pidfile, String(child.pid));
    const ready = await until(async () => {
      if (exited) return 'exited';
      try { return (await fetch(`${BASE}/readyz`)).status === 200 ? 'ready' : false; } catch { return false; }
    }, { timeout: Math.max(1_000, end - Date.now()), what: 'the restarted server to be ready' });
    if (ready === 'ready') return;
    assert.ok(Date.now() < end, 'the restarted server kept exiting');
    await new Promise((r) => setTimeout(r, 200));
  }
}

test('live updates reconnect with a fresh ticket after the server drops the stream', async () => {
  await go('');
  await page.locator('.live[data-state="connected"]').waitFor();
  const tickets = [];
  const onReq = (r) => { if (r.url().endsWith('/api/v1/events/ticket')) tickets.push(r.url()); };
  page.on('request', onReq);
  const sawReconnecting = page.locator('.live[data-state="reconnecting"]').waitFor({ timeout: 30_000 });
  await restartServer();
  await sawReconnecting;
  await page.locator('.live[data-state="connected"]').waitFor({ timeout: 30_000 });
  page.off('request', onReq);
  assert.ok(tickets.length >= 1, 'a new ticket was requested for the new connection');
  // Events flow on the new connection: a job started from outside the page shows up live.
  const r = await http('POST', '/api/v1/jobs', { token: apiToken, body: { kind: 'demo', payload: { steps: 4, step_ms: 150 } } });
  assert.equal(r.status, 202, r.text);
  await page.locator(`li.job[data-job-id="${r.json.id}"][data-status="succeeded"]`).waitFor({ timeout: 20_000 });
  await shot('dashboard-after-reconnect');
});

test('upload an archive, analyze it, and see the per-language table and SVG chart', async (t) => {
  const probe = await http('POST', '/api/v1/jobs', { token: apiToken, body: { kind: 'analyze', payload: { upload_id: 'nope' } } });
  if (probe.status === 422 && /kind/i.test(probe.json?.detail || '')) {
    if (STRICT) assert.fail('needs the analyze job kind');
    return t.skip(`needs the analyze job kind (server says: ${probe.json.detail})`);
  }
  const dir = mkdtempSync(join(tmpdir(), 'wb-e2e-src-'));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  mkdirSync(join(dir, 'src'));
  writeFileSync(join(dir, 'src', 'main.rs'), '// entry\nfn main() {\n    println!("hi");\n}\n\n');
  writeFileSync(join(dir, 'src', 'lib.rs'), '/// docs\npub fn f() -> u8 {\n    1\n}\n');
  writeFileSync(join(dir, 'tool.py'), '# a tool\nimport sys\n\nprint(sys.argv)\n');
  const archive = join(dir, 'code.tar.gz');
  execFileSync('tar', ['czf', archive, '-C', dir, 'src', 'tool.py']);
  await go('');
  // Right after the server restart of the previous test the dashboard may re-render once
  // and replace the file input; choose the file again if it was lost.
  let uploaded = false;
  for (let i = 0; i < 3 && !uploaded; i++) {
    await page.getByLabel('Archive (.tar.gz or .zip)').setInputFiles(archive);
    await page.getByRole('button', { name: 'Upload and analyze' }).click();
    uploaded = await page.getByText(/^Uploaded .*queued\.$/).waitFor({ timeout: 10_000 })
      .then(() => true, () => false);
  }
  if (!uploaded) {
    await shot('analyze-upload-failed');
    assert.fail('the archive upload never reported "Uploaded … queued."');
  }
  const id = await page.locator('li.job').first().getAttribute('data-job-id');
  await page.locator(`li.job[data-job-id="${id}"][data-status="succeeded"]`).waitFor({ timeout: 30_000 });
  await page.locator(`li.job[data-job-id="${id}"]`).getByRole('link', { name: 'View result' }).click();
  await page.locator('table.stats').waitFor();
  const langs = await page.locator('table.stats tbody th').allTextContents();
  assert.ok(langs.includes('Rust') && langs.includes('Python'), `languages: ${langs}`);
  assert.ok(await page.locator('svg.chart rect.code').count() >= 2, 'bars drawn');
  await checkA11y('analyze result');
  await shot('analyze-result');
});

test('billing page lists plans with limits and prices and the current plan', async () => {
  await go('billing');
  await page.locator('article.plan[data-plan="pro"]').waitFor();
  const pro = await page.locator('article.plan[data-plan="pro"]').textContent();
  assert.match(pro, /\$19\.00/);
  assert.match(pro, /1,000 jobs per period/);
  await page.locator('.current dd [data-status]').waitFor();
  assert.equal(await page.locator('.current dd [data-status]').getAttribute('data-status'), 'free');
  assert.match(await page.locator('.usage label').textContent(), /Jobs this period: \d+ of [\d,]+/);
  await checkA11y('billing');
  await shot('billing-free');
});

test('step 3: subscribe through the fake Stripe checkout, then the plan shows active', async (t) => {
  if (await needs(t, 'POST /api/v1/billing/checkout', 'GET /api/v1/billing/subscription')) return;
  await go('billing');
  await page.getByRole('button', { name: 'Subscribe to Pro' }).click();
  await page.waitForURL(/\/fake-stripe\/checkout\//, { timeout: 15_000 });
  await shot('fake-stripe-checkout');
  await page.getByRole('button', { name: /pay|subscribe|complete|confirm/i }).first().click();
  await page.waitForURL((u) => u.origin === new URL(BASE).origin && u.pathname === '/' , { timeout: 20_000 });
  if (!page.url().includes('#/billing')) await go('billing');
  await until(async () => {
    const s = await page.locator('.current dd [data-status]').getAttribute('data-status').catch(() => null);
    if (s === 'active') return true;
    await go('billing');
    return false;
  }, { timeout: 30_000, every: 1000, what: 'status active on the billing page' });
  assert.match(await page.locator('.current').textContent(), /Pro/);
  assert.match(await page.locator('.current').textContent(), /Renews on/);
  await shot('billing-active');
});

test('account page shows profile, providers and sessions', async (t) => {
  await go('account');
  await page.locator('h2', { hasText: 'Active sessions' }).waitFor();
  assert.match(await page.locator('.account').textContent(), new RegExp(EMAIL.replace(/[+.]/g, '\\$&')));
  await checkA11y('account');
  await shot('account');
  if (await needs(t, 'GET /api/v1/auth/sessions')) return;
  await page.locator('li[data-current="true"]').waitFor();
});

test('step 4: revoke another session from the account page', async (t) => {
  if (await needs(t, 'GET /api/v1/auth/sessions', 'DELETE /api/v1/auth/sessions/x', 'POST /api/v1/auth/login')) return;
  const other = await http('POST', '/api/v1/auth/login', { body: { email: EMAIL, password: PASSWORD } });
  assert.equal(other.status, 200, other.text);
  const sid = JSON.parse(Buffer.from(other.json.access_token.split('.')[1], 'base64url')).sid;
  await go('account');
  const row = page.locator(`li[data-session-id="${sid}"]`);
  await row.waitFor();
  await shot('account-sessions');
  await row.getByRole('button', { name: /Revoke/ }).click();
  await row.waitFor({ state: 'detached' });
  await page.getByText('Session revoked.').waitFor();
  const gone = await http('POST', '/api/v1/auth/refresh', { body: { refresh_token: other.json.refresh_token } });
  // A refresh token of a revoked session is an invalid grant (OAuth 2 semantics).
  assert.equal(gone.status, 400, 'the revoked session cannot refresh');
  assert.equal(gone.json.code, 'invalid_grant');
  const me = await http('GET', '/api/v1/me', { token: other.json.access_token });
  assert.equal(me.status, 401, 'the revoked session access token stops working');
});

test('step 5: admin retries a dead job from the dead-letter queue (and discards another)', async () => {
  await go('');
  await page.getByLabel('Steps').fill('1');
  await page.getByLabel('Milliseconds per step').fill('0');
  await page.getByLabel(/Fail permanently/).check();
  await page.getByRole('button', { name: 'Run demo job' }).click();
  await page.getByText(/queued\.$/).waitFor();
  const id = await page.locator('li.job').first().getAttribute('data-job-id');
  await page.locator(`li.job[data-job-id="${id}"][data-status="dead"]`).waitFor({ timeout: 20_000 });
  await shot('dashboard-job-dead');
  const spare = await http('POST', '/api/v1/jobs', { token: apiToken, body: { kind: 'demo', payload: { steps: 1, step_ms: 0, permanent_fail: true } } });
  await until(async () => (await http('GET', `/api/v1/jobs/${spare.json.id}`, { token: apiToken })).json?.status === 'dead', { what: 'second dead job' });

  await page.getByRole('link', { name: 'Admin' }).click();
  const row = page.locator(`tr[data-job-id="${id}"]`);
  await row.waitFor();
  await checkA11y('admin');
  await shot('admin');
  await row.getByRole('button', { name: /^Retry/ }).click();
  await page.getByText(/queued again\.$/).waitFor();
  // permanent_fail makes the retried attempt fail again: attempt 2 proves it ran again.
  const j = await until(async () => {
    const r = await http('GET', `/api/v1/jobs/${id}`, { token: apiToken });
    return r.json?.attempt >= 2 && r.json.status === 'dead' ? r.json : null;
  }, { what: 'the retried job to run a second attempt' });
  assert.equal(j.attempt, 2);

  await page.locator(`tr[data-job-id="${spare.json.id}"]`).getByRole('button', { name: /^Discard/ }).click();
  await page.getByText(/discarded\.$/).waitFor();
  await page.locator(`tr[data-job-id="${spare.json.id}"]`).waitFor({ state: 'detached' });
  const dlq = await http('GET', '/api/v1/admin/jobs/dead', { token: apiToken });
  assert.ok(!dlq.json.items.some((x) => x.id === spare.json.id), 'discarded job left the DLQ');
  await shot('admin-after-retry');
});

test('narrow screens (360 px): every signed-in page fits without horizontal scrolling', async () => {
  await page.setViewportSize({ width: 360, height: 760 });
  try {
    for (const [hash, name] of [['', 'dashboard'], ['billing', 'billing'], ['account', 'account'], ['admin', 'admin']]) {
      await go(hash);
      await page.waitForLoadState('networkidle').catch(() => {});
      await checkA11y(`${name} at 360px`);
      await shot(`mobile-${name}`);
    }
  } finally {
    await page.setViewportSize({ width: 1280, height: 860 });
  }
});

test('a revoked session (logout-all elsewhere) returns to sign-in with a message', async (t) => {
  if (await needs(t, 'POST /api/v1/auth/login', 'POST /api/v1/auth/logout-all')) return;
  const other = await http('POST', '/api/v1/auth/login', { body: { email: EMAIL, password: PASSWORD } });
  assert.equal(other.status, 200, other.text);
  const r = await http('POST', '/api/v1/auth/logout-all', { token: other.json.access_token, body: {} });
  assert.equal(r.status, 204, r.text);
  await go('billing').catch(() => {});
  await page.locator('h1', { hasText: 'Sign in' }).waitFor();
  await page.getByText('Your session was ended').waitFor();
  await noStoredRefresh('the revoked refresh token to be forgotten');
  await shot('signin-after-revoked');
});

test('sign in with email and password, then sign out everywhere', async (t) => {
  if (await needs(t, 'POST /api/v1/auth/login', 'POST /api/v1/auth/logout-all')) return;
  await go('signin');
  await page.getByLabel('Email').fill(EMAIL);
  await page.getByLabel('Password').fill('wrong password!!');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('.form-errors .notice.error').waitFor();
  await shot('signin-wrong-password');
  await page.getByLabel('Password').fill(PASSWORD);
  await page.getByRole('button', { name: 'Sign in' }).click();
  // Signing in returns to the page the user was sent away from (here: billing).
  await page.getByRole('link', { name: 'Account' }).waitFor();
  await go('account');
  await page.getByRole('button', { name: 'Sign out everywhere' }).click();
  await page.getByText('You were signed out on every device.').waitFor();
  await noStoredRefresh('the refresh token to be forgotten at sign-out');
});

test('no uncaught script errors and no CSP violations on any page', () => {
  assert.deepEqual(problems, []);
});
