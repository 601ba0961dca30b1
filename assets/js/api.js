// The HTTP client and the signed-in session.
//
// Tokens: the access token lives in memory only (this module's variables); the refresh
// token lives in IndexedDB (`tokens` below) so a reload keeps the user signed in.
// Refreshes happen ~60 s before the access token expires and on a `token_expired` answer.
// Refresh tokens rotate on every use and the server treats a second use as theft
// (`refresh_reused`, whole session revoked), so every refresh - in this tab and across
// tabs - runs inside one Web Lock and re-reads the stored token inside it: another tab may
// have rotated the token while we waited. The tab that refreshed shares the new access
// token with the other tabs over a BroadcastChannel (memory to memory), so N open tabs
// cost one rotation, not N.
// See docs/ui.md for the XSS/CSRF trade-off.

const REFRESH_KEY = 'warpbase.refresh_token';
const DB_NAME = 'warpbase';
const DB_STORE = 'auth';
const LOCK = 'warpbase-refresh';
const EARLY_MS = 60_000;

let access = null;
let accessExp = 0; // ms since epoch
let user = null;
let timer = null;
let inflight = null;
const listeners = new Set();
const channel = 'BroadcastChannel' in self ? new BroadcastChannel('warpbase-auth') : null;

export class ApiError extends Error {
  constructor(status, problem) {
    const p = problem && typeof problem === 'object' ? problem : {};
    super(p.detail || p.title || `Request failed (${status})`);
    this.status = status;
    this.code = p.code || (status === 0 ? 'network' : 'error');
    this.detail = p.detail || p.title || this.message;
    this.requestId = p.request_id || null;
  }
}

/** Why the user was signed out, in words for the sign-in page. */
export const SIGNED_OUT_MESSAGES = {
  session_revoked: 'Your session was ended (signed out elsewhere, or the password changed). Please sign in again.',
  refresh_reused: 'For your safety this session was ended: its refresh token was used twice. Please sign in again.',
  invalid_grant: 'Your session has expired. Please sign in again.',
  unauthorized: 'Your session has expired. Please sign in again.',
  logout_all: 'You were signed out on every device.',
};

export const session = {
  get user() { return user; },
  get signedIn() { return user !== null; },
  onChange(fn) { listeners.add(fn); return () => listeners.delete(fn); },
};

function emit(reason) {
  for (const fn of listeners) fn(user, reason);
}

async function problemOf(res) {
  try {
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

/**
 * Where the refresh token is kept: IndexedDB, not localStorage. Chromium hands a
 * localStorage write to other tabs' processes asynchronously, so a tab that takes the
 * refresh lock right after another tab rotated the token can still read the old one and
 * present it: a reuse, which under the strict default revokes the whole session. An
 * IndexedDB transaction that completed before the lock was released is seen by every
 * transaction started after it was taken (one backend per origin, no per-tab cache).
 * Where IndexedDB cannot be opened (some private modes) localStorage is the fallback.
 */
const tokens = (() => {
  let opening = null;
  function db() {
    if (!opening) {
      opening = new Promise((resolve) => {
        try {
          const req = indexedDB.open(DB_NAME, 1);
          req.onupgradeneeded = () => req.result.createObjectStore(DB_STORE);
          req.onsuccess = () => resolve(req.result);
          req.onerror = () => resolve(null);
          req.onblocked = () => resolve(null);
        } catch {
          resolve(null);
        }
      });
    }
    return opening;
  }
  // Runs one request in its own transaction; resolves when the transaction has committed.
  async function run(mode, op) {
    const d = await db();
    if (!d) return { fallback: true };
    return new Promise((resolve, reject) => {
      const tx = d.transaction(DB_STORE, mode, { durability: 'strict' });
      const req = op(tx.objectStore(DB_STORE));
      tx.oncomplete = () => resolve({ value: req.result });
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
    });
  }
  return {
    async get() {
      const r = await run('readonly', (st) => st.get(REFRESH_KEY));
      if (r.fallback) return localStorage.getItem(REFRESH_KEY);
      if (r.value != null) return r.value;
      // Moved here from localStorage, where earlier builds kept it.
      const legacy = localStorage.getItem(REFRESH_KEY);
      if (!legacy) return null;
      await this.set(legacy);
      localStorage.removeItem(REFRESH_KEY);
      return legacy;
    },
    async set(token) {
      const r = await run('readwrite', (st) => st.put(token, REFRESH_KEY));
      if (r.fallback) localStorage.setItem(REFRESH_KEY, token);
    },
    async clear() {
      const r = await run('readwrite', (st) => st.delete(REFRESH_KEY));
      if (r.fallback) localStorage.removeItem(REFRESH_KEY);
    },
  };
})();

function withLock(fn) {
  if (navigator.locks && navigator.locks.request) return navigator.locks.request(LOCK, fn);
  return fn(); // no Web Locks (plain http on a non-local host): this tab still serialises
}

function schedule(expiresInMs) {
  clearTimeout(timer);
  const wait = Math.max(5_000, expiresInMs - EARLY_MS);
  timer = setTimeout(() => { refresh().catch(() => {}); }, wait);
}

/**
 * Takes a TokenPair: access token to memory, refresh token to storage. Resolves once the
 * refresh token is stored, so a caller holding the lock releases it only after that.
 */
async function adopt(pair, { broadcast = true } = {}) {
  if (pair.refresh_token) await tokens.set(pair.refresh_token);
  access = pair.access_token;
  accessExp = Date.now() + (pair.expires_in || 900) * 1000;
  schedule(accessExp - Date.now());
  const had = user;
  if (pair.user) user = pair.user;
  if (broadcast && channel) {
    channel.postMessage({ type: 'access', access_token: access, exp: accessExp, user });
  }
  if (pair.user && (!had || had.id !== pair.user.id)) emit('signed_in');
}

channel?.addEventListener('message', (ev) => {
  const m = ev.data || {};
  if (m.type === 'access' && m.exp > accessExp) {
    access = m.access_token;
    accessExp = m.exp;
    const had = user;
    if (m.user) user = m.user;
    schedule(accessExp - Date.now());
    if (!had && user) emit('signed_in');
  } else if (m.type === 'signout' && user) {
    localSignOut(m.reason || null, false);
  }
});

/**
 * Signs this tab out. `forget: false` keeps the stored refresh token (it is newer than the
 * one that failed: another tab signed in meanwhile).
 */
function localSignOut(reason, broadcast = true, { forget = true } = {}) {
  clearTimeout(timer);
  access = null;
  accessExp = 0;
  const was = user;
  user = null;
  if (forget) tokens.clear().catch(() => {});
  if (broadcast && channel) channel.postMessage({ type: 'signout', reason });
  if (was || reason) emit(reason || 'signed_out');
}

/**
 * Gets a fresh access token with the stored refresh token. One at a time per tab, and
 * one at a time across tabs (Web Lock); inside the lock the token is re-read because
 * another tab may have rotated it.
 */
export function refresh() {
  if (inflight) return inflight;
  inflight = withLock(async () => {
    // Another tab refreshed (before or while we waited for the lock) and shared its access
    // token. A token_expired answer zeroes accessExp first, so it always gets here.
    if (access && accessExp - Date.now() > EARLY_MS) return true;
    const token = await tokens.get();
    if (!token) {
      if (user) localSignOut('unauthorized');
      return false;
    }
    let res;
    try {
      res = await fetch('/api/v1/auth/refresh', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify({ refresh_token: token }),
      });
    } catch {
      throw new ApiError(0, { detail: 'The server cannot be reached. Check your connection.' });
    }
    if (res.ok) {
      await adopt(await res.json());
      return true;
    }
    const p = await problemOf(res);
    if (res.status === 401 || res.status === 400) {
      // Only forget the token we presented; a newer one (login in another tab) stays.
      if ((await tokens.get()) === token) localSignOut(p?.code || 'unauthorized');
      else localSignOut(p?.code || 'unauthorized', false, { forget: false });
      return false;
    }
    throw new ApiError(res.status, p);
  }).finally(() => { inflight = null; });
  return inflight;
}

async function ensureAccess() {
  if (access && Date.now() < accessExp - 5_000) return true;
  return refresh();
}

/**
 * Calls the API. `body` is sent as JSON unless `raw` is given (a Blob/File sent as is).
 * Answers parsed JSON, null for 204; throws ApiError with the problem+json `detail`.
 */
export async function api(method, path, { body, raw, headers = {}, auth = true, retried = false } = {}) {
  const h = { Accept: 'application/json', ...headers };
  let payload;
  if (raw !== undefined) {
    payload = raw;
    if (!h['Content-Type']) h['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    h['Content-Type'] = 'application/json';
  }
  if (auth) {
    const ok = await ensureAccess();
    if (!ok || !access) throw new ApiError(401, { code: 'unauthorized', detail: 'Please sign in.' });
    h.Authorization = `Bearer ${access}`;
  }
  let res;
  try {
    res = await fetch(`/api/v1${path}`, { method, headers: h, body: payload });
  } catch {
    throw new ApiError(0, { detail: 'The server cannot be reached. Check your connection.' });
  }
  if (res.status === 401 && auth) {
    const p = await problemOf(res);
    const code = p?.code;
    if (code === 'token_expired' && !retried) {
      accessExp = 0;
      if (await refresh()) return api(method, path, { body, raw, headers, auth, retried: true });
    } else if (code === 'session_revoked' || code === 'refresh_reused' || code === 'unauthorized') {
      localSignOut(code);
    }
    throw new ApiError(401, p);
  }
  if (!res.ok) throw new ApiError(res.status, await problemOf(res));
  if (res.status === 204) return null;
  const ct = res.headers.get('Content-Type') || '';
  return ct.includes('json') ? res.json() : res.text();
}

/** Reload: a stored refresh token becomes a signed-in session again. */
export async function restore() {
  if (!(await tokens.get())) return null;
  const ok = await refresh();
  if (!ok) return null;
  if (!user) user = await api('GET', '/me');
  emit('signed_in');
  return user;
}

export async function reloadUser() {
  user = await api('GET', '/me');
  emit('updated');
  return user;
}

async function signInWith(path, body) {
  const pair = await api('POST', path, { body, auth: false });
  if (!pair.user) {
    access = pair.access_token; // /me needs it; adopt() below records the rest
    accessExp = Date.now() + (pair.expires_in || 900) * 1000;
    pair.user = await api('GET', '/me');
  }
  // Stored under the lock, so a refresh another tab starts next reads this token.
  await withLock(() => adopt(pair));
  return pair.user;
}

export const login = (email, password) => signInWith('/auth/login', { email, password });
export const register = (email, password, name) =>
  signInWith('/auth/register', name ? { email, password, name } : { email, password });
export const exchangeOAuthCode = (code) => signInWith('/auth/oauth/exchange', { code });

export async function changePassword(current_password, new_password) {
  const pair = await api('POST', '/auth/password', { body: { current_password, new_password } });
  await withLock(() => adopt({ ...pair, user: pair.user || user }));
}

export async function logout() {
  const token = await tokens.get();
  try {
    if (access) await api('POST', '/auth/logout', { body: token ? { refresh_token: token } : {} });
  } catch { /* signing out locally is what matters */ }
  localSignOut('signed_out');
}

export async function logoutAll() {
  await api('POST', '/auth/logout-all', { body: {} });
  localSignOut('logout_all');
}

/** Ends this tab's session because the server said so (e.g. the current session revoked). */
export const forgetSession = (reason) => localSignOut(reason);
