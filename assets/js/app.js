// The single-page app: a hash router (so the server's SPA fallback is never needed for
// deep links, and OAuth redirects to /#/auth/complete?code=... work), the page frame, and
// the switch between signed-in and public pages.

import { h, clear, notice } from './dom.js';
import { session, restore, logout, SIGNED_OUT_MESSAGES } from './api.js';
import * as authViews from './views/auth.js';
import * as dashboard from './views/dashboard.js';
import * as jobView from './views/job.js';
import * as billing from './views/billing.js';
import * as account from './views/account.js';
import * as admin from './views/admin.js';

const PUBLIC = {
  signin: authViews.signIn,
  register: authViews.register,
  forgot: authViews.forgot,
  reset: authViews.reset,
  verify: authViews.verify,
  'auth/complete': authViews.oauthComplete,
  'auth/error': authViews.oauthError,
};

const PRIVATE = [
  [/^$/, dashboard.render, 'Jobs'],
  [/^jobs\/([\w-]+)$/, jobView.render, 'Jobs'],
  [/^billing$/, billing.render, 'Billing'],
  [/^account$/, account.render, 'Account'],
  [/^admin$/, admin.render, 'Admin'],
];

const app = document.getElementById('app');
let cleanups = [];
let flash = null; // {kind, text} shown once on the next page
let renderSeq = 0;
let booted = false;

export function navigate(path, { replace = false, message } = {}) {
  if (message) flash = message;
  const target = `#/${path.replace(/^[#/]+/, '')}`;
  if (replace) history.replaceState(null, '', target);
  else if (location.hash !== target) { location.hash = target; return; }
  route();
}

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, qs = ''] = raw.split('?');
  return { path: path.replace(/\/$/, ''), query: new URLSearchParams(qs) };
}

function runCleanups() {
  for (const fn of cleanups) { try { fn(); } catch { /* ignore */ } }
  cleanups = [];
}

function header(active) {
  const u = session.user;
  const links = [['', 'Jobs'], ['billing', 'Billing'], ['account', 'Account']];
  if (u?.role === 'admin') links.push(['admin', 'Admin']);
  return h('header.top',
    h('a.brand', { href: '#/' }, h('span.logo', { 'aria-hidden': 'true' }, '⚡'), 'warpbase'),
    h('nav', { 'aria-label': 'Main' },
      h('ul', links.map(([p, label]) => h('li', h('a', {
        href: `#/${p}`, 'aria-current': active === label ? 'page' : null,
      }, label))))),
    h('div.who',
      h('span.email', { title: u?.email || '' }, u?.email || ''),
      h('button.link', { type: 'button', onclick: () => logout() }, 'Sign out')));
}

async function route() {
  const seq = ++renderSeq;
  runCleanups();
  const { path, query } = parseHash();
  const ctx = {
    query,
    params: [],
    navigate,
    onCleanup: (fn) => cleanups.push(fn),
    flash: flash ? [flash] : [],
  };
  flash = null;

  let view;
  let title;
  let frame = false;
  if (PUBLIC[path]) {
    view = PUBLIC[path];
    if (session.signedIn && (path === 'signin' || path === 'register')) return navigate('', { replace: true });
  } else if (!session.signedIn) {
    if (path) sessionStorage.setItem('warpbase.after_signin', path + (query.toString() ? `?${query}` : ''));
    return navigate('signin', { replace: true, message: ctx.flash[0] });
  } else {
    const hit = PRIVATE.find(([re]) => re.test(path));
    if (!hit) {
      view = async () => h('section', h('h1', 'Page not found'),
        h('p', 'There is nothing at this address. ', h('a', { href: '#/' }, 'Go to your jobs')));
      title = 'Not found';
    } else {
      ctx.params = path.match(hit[0]).slice(1);
      view = hit[1];
      title = hit[2];
    }
    frame = true;
  }

  const main = h('main', { id: 'main', tabindex: '-1' });
  let node;
  try {
    node = await view(ctx);
  } catch (e) {
    node = h('section', h('h1', 'Something went wrong'), notice('error', e.detail || e.message));
  }
  if (seq !== renderSeq) return; // a newer navigation won
  main.append(...ctx.flash.map((f) => notice(f.kind, f.text)), node);
  clear(app);
  if (frame) app.append(h('a.skip', { href: '#main', onclick: skip }, 'Skip to content'), header(title), main);
  else app.append(h('div.public', main));
  const h1 = main.querySelector('h1');
  document.title = h1 ? `${h1.textContent} · warpbase` : 'warpbase';
  main.focus({ preventScroll: true });
}

function skip(ev) {
  ev.preventDefault();
  document.getElementById('main')?.focus();
}

session.onChange((user, reason) => {
  if (!booted) {
    // The first route() below renders whatever restore() decided; keep its reason.
    if (!user && SIGNED_OUT_MESSAGES[reason]) flash = { kind: 'warn', text: SIGNED_OUT_MESSAGES[reason] };
    return;
  }
  if (user && reason === 'signed_in') {
    const after = sessionStorage.getItem('warpbase.after_signin');
    sessionStorage.removeItem('warpbase.after_signin');
    const { path } = parseHash();
    if (PUBLIC[path] || !path) navigate(after || '', { replace: true });
  } else if (!user) {
    const text = SIGNED_OUT_MESSAGES[reason];
    navigate('signin', { replace: true, message: text ? { kind: 'warn', text } : undefined });
  } else if (reason === 'updated') {
    const top = document.querySelector('header.top');
    if (top) top.replaceWith(header(document.querySelector('[aria-current="page"]')?.textContent));
  }
});

addEventListener('hashchange', route);

(async () => {
  const { path } = parseHash();
  // The OAuth completion and one-time links must not spend the stored session first.
  if (!PUBLIC[path] || path === 'signin' || path === 'register') {
    try {
      await restore();
    } catch (e) {
      flash = { kind: 'error', text: e.detail || 'Could not restore your session.' };
    }
  }
  booted = true;
  route();
})();
