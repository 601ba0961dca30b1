// Account: profile, linked sign-in providers, active sessions, password, sign out everywhere.

import { h, field, notice, fmtDate } from '../dom.js';
import { api, session, reloadUser, changePassword, logoutAll, forgetSession } from '../api.js';
import { form } from './auth.js';

export async function render() {
  let user = session.user;
  try { user = await reloadUser(); } catch { /* show what we have */ }

  return h('section.account',
    h('h1', 'Account'),
    h('div.two',
      h('section.card', { 'aria-labelledby': 'prof-h' }, h('h2', { id: 'prof-h' }, 'Profile'), profile(user)),
      h('section.card', { 'aria-labelledby': 'prov-h' }, h('h2', { id: 'prov-h' }, 'Sign-in providers'), await providers(user))),
    h('section.card', { 'aria-labelledby': 'sess-h' }, h('h2', { id: 'sess-h' }, 'Active sessions'), await sessions()),
    h('div.two',
      h('section.card', { 'aria-labelledby': 'pw-h' }, h('h2', { id: 'pw-h' }, 'Change password'), passwordForm()),
      h('section.card.danger', { 'aria-labelledby': 'all-h' }, h('h2', { id: 'all-h' }, 'Sign out everywhere'),
        h('p.muted', 'Ends every session on every device, including this one.'), logoutAllButton())));
}

function profile(u) {
  const msg = h('div', { 'aria-live': 'polite' });
  const verify = u.email_verified
    ? h('span.badge.s-succeeded', 'verified')
    : h('span', h('span.badge.s-retrying', 'not verified'), ' ',
      h('button.small', {
        type: 'button',
        onclick: async (ev) => {
          ev.currentTarget.disabled = true;
          try {
            await api('POST', '/auth/verify-email/request', { body: {} });
            msg.replaceChildren(notice('ok', 'A confirmation link is on its way to your inbox.'));
          } catch (e) { msg.replaceChildren(notice('error', e.detail)); ev.target.disabled = false; }
        },
      }, 'Send confirmation email'));
  return h('div',
    h('dl.facts',
      h('dt', 'Name'), h('dd', u.name || '—'),
      h('dt', 'Email'), h('dd', h('span.break', u.email), ' ', verify),
      h('dt', 'Role'), h('dd', u.role),
      h('dt', 'Member since'), h('dd', fmtDate(u.created_at))),
    msg);
}

async function providers(u) {
  const msg = h('div', { 'aria-live': 'polite' });
  let items = [];
  try {
    ({ items = [] } = await api('GET', '/auth/providers', { auth: false }));
  } catch (e) {
    if (e.status !== 404) msg.append(notice('error', `Could not load providers: ${e.detail}`));
  }
  const linked = new Map((u.identities || []).map((i) => [i.provider, i]));
  // Identities of providers since disabled still show, so they can be unlinked.
  for (const p of linked.keys()) if (!items.some((i) => i.id === p)) items.push({ id: p, name: p });
  if (!items.length) {
    return h('div.empty', h('p', 'No sign-in providers are enabled on this server.'),
      h('p.muted', 'You sign in with your email and password.'), msg);
  }
  const list = h('ul.rows', items.map((p) => {
    const id = linked.get(p.id);
    const btn = id
      ? h('button.small', {
        type: 'button', 'aria-label': `Unlink ${p.name}`,
        onclick: async (ev) => {
          ev.currentTarget.disabled = true;
          msg.replaceChildren();
          try {
            await api('DELETE', `/auth/identities/${encodeURIComponent(p.id)}`);
            await reloadUser();
            location.hash = '#/account';
            window.dispatchEvent(new HashChangeEvent('hashchange'));
          } catch (e) {
            msg.replaceChildren(notice('error', e.code === 'last_login_method'
              ? `${e.detail} Set a password or link another provider first.` : e.detail));
            ev.target.disabled = false;
          }
        },
      }, 'Unlink')
      : h('button.small', {
        type: 'button', 'aria-label': `Link ${p.name}`,
        onclick: async (ev) => {
          ev.currentTarget.disabled = true;
          try {
            const { authorize_url: url } = await api('POST', `/auth/oauth/${encodeURIComponent(p.id)}/link`, { body: {} });
            location.assign(url);
          } catch (e) { msg.replaceChildren(notice('error', e.detail)); ev.target.disabled = false; }
        },
      }, 'Link');
    return h('li', h('span', h('strong', p.name), id?.email ? h('span.muted', ` · ${id.email}`) : null,
      id ? h('span.badge.s-succeeded', 'linked') : null), btn);
  }));
  return h('div', list, msg);
}

async function sessions() {
  const box = h('div');
  const msg = h('div', { 'aria-live': 'polite' });
  async function load() {
    try {
      const { items } = await api('GET', '/auth/sessions');
      box.replaceChildren(items.length ? h('ul.rows.sessions', items.map(row)) : h('p.muted', 'No active sessions.'), msg);
    } catch (e) {
      box.replaceChildren(e.status === 404
        ? h('p.muted', 'Session management is not available on this server version.')
        : notice('error', `Could not load your sessions: ${e.detail}`), msg);
    }
  }
  function row(s) {
    return h('li', { dataset: { sessionId: s.id, current: s.current ? 'true' : 'false' } },
      h('span.sess',
        h('strong', agent(s.user_agent)), s.current ? h('span.badge.s-running', 'this device') : null,
        h('br'),
        h('span.muted', `${s.ip || 'unknown address'} · signed in ${fmtDate(s.created_at)} · last active ${fmtDate(s.last_used_at)}`)),
      h('button.small', {
        type: 'button', 'aria-label': `Revoke session ${agent(s.user_agent)}${s.current ? ' (this device)' : ''}`,
        onclick: async (ev) => {
          ev.currentTarget.disabled = true;
          try {
            await api('DELETE', `/auth/sessions/${encodeURIComponent(s.id)}`);
            if (s.current) { forgetSession('signed_out'); return; }
            msg.replaceChildren(notice('ok', 'Session revoked.'));
            await load();
          } catch (e) { msg.replaceChildren(notice('error', e.detail)); ev.target.disabled = false; }
        },
      }, s.current ? 'Sign out' : 'Revoke'));
  }
  await load();
  return box;
}

function agent(ua) {
  if (!ua) return 'Unknown client';
  const browser = /Firefox\/|Edg\/|Chrome\/|Safari\//.exec(ua)?.[0]?.replace('/', '') || null;
  const os = /Windows|Mac OS X|Android|iPhone|Linux/.exec(ua)?.[0] || null;
  return [browser === 'Edg' ? 'Edge' : browser, os].filter(Boolean).join(' on ') || ua.slice(0, 40);
}

function passwordForm() {
  return form([
    field('Current password', h('input', { name: 'current_password', type: 'password', autocomplete: 'current-password', required: true })),
    field('New password', h('input', { name: 'new_password', type: 'password', autocomplete: 'new-password', minlength: 10, required: true }),
      'At least 10 characters. Every other session is signed out.'),
  ], 'Change password', async (d, f) => {
    await changePassword(d.get('current_password'), d.get('new_password'));
    f.reset();
    return 'Password changed. Your other sessions were signed out.';
  });
}

function logoutAllButton() {
  const msg = h('div', { 'aria-live': 'polite' });
  return h('div', h('button.danger', {
    type: 'button',
    onclick: async (ev) => {
      ev.currentTarget.disabled = true;
      try { await logoutAll(); } catch (e) { msg.replaceChildren(notice('error', e.detail)); ev.target.disabled = false; }
    },
  }, 'Sign out everywhere'), msg);
}
