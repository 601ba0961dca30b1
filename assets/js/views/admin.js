// Admin: the dead-letter queue (retry, discard), recent Stripe webhook events (replay),
// and the users list.

import { h, notice, fmtDate } from '../dom.js';
import { api, session } from '../api.js';
import { shortId, describe } from '../jobs.js';

export async function render() {
  if (session.user?.role !== 'admin') {
    return h('section', h('h1', 'Admin'), notice('error', 'This page is for administrators.'));
  }
  const [dead, events, users] = await Promise.all([deadLetters(), webhookEvents(), userList()]);
  return h('section.admin',
    h('h1', 'Admin'),
    h('section.card', { 'aria-labelledby': 'dlq-h' }, h('h2', { id: 'dlq-h' }, 'Dead-letter queue'), dead),
    h('section.card', { 'aria-labelledby': 'wh-h' }, h('h2', { id: 'wh-h' }, 'Webhook events'), events),
    h('section.card', { 'aria-labelledby': 'us-h' }, h('h2', { id: 'us-h' }, 'Users'), users));
}

function unavailable(e, what) {
  if (e.status === 404 || e.status === 405) {
    return h('p.muted', `${what} is not available on this server version.`);
  }
  return notice('error', `Could not load ${what.toLowerCase()}: ${e.detail}`);
}

async function deadLetters() {
  const box = h('div');
  const msg = h('div', { 'aria-live': 'polite' });
  async function load() {
    try {
      const { items } = await api('GET', '/admin/jobs/dead?limit=100');
      if (!items.length) {
        box.replaceChildren(h('div.empty', h('p', 'The dead-letter queue is empty.'),
          h('p.muted', 'Jobs that fail permanently or run out of attempts land here.')), msg);
        return;
      }
      box.replaceChildren(h('div.table-wrap', h('table.dlq',
        h('thead', h('tr', ['Job', 'Kind', 'Attempts', 'Error', 'Failed', ''].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', items.map(row)))), msg);
    } catch (e) {
      box.replaceChildren(unavailable(e, 'The dead-letter queue'), msg);
    }
  }
  function row(j) {
    const act = (label, fn) => h('button.small', {
      type: 'button', 'aria-label': `${label} job ${shortId(j.id)}`,
      onclick: async (ev) => {
        ev.currentTarget.disabled = true;
        try {
          await fn();
          msg.replaceChildren(notice('ok', `Job ${shortId(j.id)}: ${label === 'Retry' ? 'queued again' : 'discarded'}.`));
          await load();
        } catch (e) { msg.replaceChildren(notice('error', e.detail)); ev.target.disabled = false; }
      },
    }, label);
    return h('tr', { dataset: { jobId: j.id } },
      h('td', h('code', { title: j.id }, shortId(j.id))),
      h('td', j.kind, h('br'), h('small.muted', describe(j))),
      h('td', `${j.attempt}/${j.max_attempts}`),
      h('td.wrap', j.error || '—'),
      h('td', fmtDate(j.finished_at)),
      h('td.buttons',
        act('Retry', () => api('POST', `/jobs/${j.id}/retry`, { body: {} })),
        act('Discard', () => api('DELETE', `/admin/jobs/${j.id}`))));
  }
  await load();
  return box;
}

async function webhookEvents() {
  const box = h('div');
  const msg = h('div', { 'aria-live': 'polite' });
  const filter = h('select', { id: 'wh-status' },
    ['', 'applied', 'ignored', 'stale', 'failed'].map((s) => h('option', { value: s }, s || 'all')));
  async function load() {
    try {
      const qs = filter.value ? `?status=${filter.value}` : '';
      const { items } = await api('GET', `/admin/billing/events${qs}`);
      if (!items.length) {
        box.replaceChildren(h('p.muted', 'No webhook events yet.'), msg);
        return;
      }
      box.replaceChildren(h('div.table-wrap', h('table',
        h('thead', h('tr', ['Event', 'Type', 'Status', 'Received', 'Detail', ''].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', items.map((ev) => h('tr',
          h('td', h('code', ev.id)),
          h('td', ev.type),
          h('td', h(`span.badge.w-${ev.status}`, ev.status)),
          h('td', fmtDate(ev.received_at || ev.processed_at || ev.created_at)),
          h('td.wrap', ev.error || ev.reason || '—'),
          h('td', h('button.small', {
            type: 'button', 'aria-label': `Replay event ${ev.id}`,
            onclick: async (e) => {
              e.currentTarget.disabled = true;
              try {
                await api('POST', `/admin/billing/events/${encodeURIComponent(ev.id)}/replay`, { body: {} });
                msg.replaceChildren(notice('ok', `Event ${ev.id} replayed.`));
                await load();
              } catch (err) { msg.replaceChildren(notice('error', err.detail)); e.target.disabled = false; }
            },
          }, 'Replay'))))))), msg);
    } catch (e) {
      box.replaceChildren(unavailable(e, 'The webhook event log'), msg);
    }
  }
  filter.addEventListener('change', load);
  await load();
  return h('div', h('div.field.inline', h('label', { for: 'wh-status' }, 'Status'), filter), box);
}

async function userList() {
  try {
    const { items } = await api('GET', '/admin/users');
    if (!items.length) return h('p.muted', 'No users.');
    return h('div.table-wrap', h('table',
      h('thead', h('tr', ['Email', 'Name', 'Role', 'Plan', 'Joined'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', items.map((u) => h('tr',
        h('td.break', u.email, u.email_verified ? null : h('small.muted', ' (unverified)')),
        h('td', u.name || '—'),
        h('td', u.role),
        h('td', u.plan ? `${u.plan.plan} (${u.plan.status})` : '—'),
        h('td', fmtDate(u.created_at)))))));
  } catch (e) {
    return unavailable(e, 'The users list');
  }
}
