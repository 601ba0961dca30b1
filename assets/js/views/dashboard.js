// The dashboard: the user's jobs with live progress, and forms to start new ones.

import { h, field, notice, clear, fmtBytes } from '../dom.js';
import { api } from '../api.js';
import { LiveEvents } from '../events.js';
import { jobRow, shortId, ACTIVE } from '../jobs.js';
import { form } from './auth.js';

const STATUS_WORDS = { succeeded: 'succeeded', dead: 'failed', canceled: 'was canceled', retrying: 'will be retried' };

export async function render(ctx) {
  const list = h('ul.jobs', { 'aria-label': 'Your jobs' });
  const empty = h('div.empty', { hidden: true },
    h('p', h('strong', 'No jobs yet.')),
    h('p.muted', 'Run a demo job above and watch its progress arrive live.'));
  const more = h('button.ghost', { type: 'button', hidden: true }, 'Load older jobs');
  const announcer = h('p.sr-only', { 'aria-live': 'polite', 'aria-atomic': 'true' });
  const live = h('span.live', { dataset: { state: 'connecting' } }, 'Connecting…');
  const listError = h('div');
  const rows = new Map();
  const milestones = new Map(); // job id → last announced quarter
  let cursor = null;

  // `fresh`: the job comes from a list read, newer than what the row shows. A POST answer
  // (or a fetch racing the SSE stream) may be older than the events already applied.
  function add(job, { top = false, fresh = false } = {}) {
    const existing = rows.get(job.id);
    if (existing) { if (fresh) existing.update(job); return existing; }
    const row = jobRow(job, { onChange: (j) => announce(j.id, j.status) });
    rows.set(job.id, row);
    if (top) list.prepend(row); else list.append(row);
    empty.hidden = true;
    return row;
  }

  function announce(id, status) {
    const words = STATUS_WORDS[status];
    if (words) announcer.textContent = `Job ${shortId(id)} ${words}.`;
  }

  async function load({ append = false } = {}) {
    try {
      const qs = new URLSearchParams({ limit: '20' });
      if (append && cursor) qs.set('cursor', cursor);
      const page = await api('GET', `/jobs?${qs}`);
      for (const j of page.items) add(j, { fresh: true });
      cursor = page.next_cursor;
      more.hidden = !cursor;
      empty.hidden = rows.size > 0;
      clear(listError);
    } catch (e) {
      listError.replaceChildren(notice('error', `Could not load your jobs: ${e.detail}`));
    }
  }
  more.addEventListener('click', () => load({ append: true }));

  // A job submitted here can finish before its row exists (events arrive ahead of the
  // POST answer and may be missed): follow it by polling until it is final. The live
  // stream normally gets there first; this only makes the row converge regardless.
  function follow(id, tries = 0) {
    const r = rows.get(id);
    if (!r || !ACTIVE.has(r.job.status) || tries > 60 || !document.contains(list)) return;
    setTimeout(() => {
      // Only a final state is taken from the poll: live progress is fresher than the
      // stored one (saved at most once a second), so an active poll must not overwrite it.
      api('GET', `/jobs/${id}`).then((j) => {
        if (ACTIVE.has(j.status)) follow(id, tries + 1); else rows.get(id)?.update(j);
      })
        .catch(() => {});
    }, 1000);
  }

  const fetching = new Set();
  async function onUnknown(id) {
    // An event for a job we don't show yet (started in another tab, or its POST answer
    // has not arrived yet): fetch it; whichever arrives second only updates the row.
    if (rows.has(id) || fetching.has(id)) return;
    fetching.add(id);
    try {
      add(await api('GET', `/jobs/${id}`), { top: true });
    } catch { /* gone or not ours */ } finally {
      fetching.delete(id);
    }
  }

  const events = new LiveEvents('/events', {
    state: (d) => {
      const r = rows.get(d.id);
      if (r) { r.update(d); if (d.status === 'retrying') announce(d.id, d.status); } else onUnknown(d.id);
    },
    progress: (d) => {
      const r = rows.get(d.id);
      if (!r) return onUnknown(d.id);
      r.update(d);
      const q = Math.floor(d.pct / 25);
      if (q > 0 && q < 4 && q > (milestones.get(d.id) || 0)) {
        milestones.set(d.id, q);
        announcer.textContent = `Job ${shortId(d.id)} is ${q * 25}% done.`;
      }
    },
    done: (d) => {
      const r = rows.get(d.id);
      if (r) { r.update(d); announce(d.id, d.status); } else onUnknown(d.id);
    },
    status: (s) => {
      live.dataset.state = s;
      live.textContent = { connected: 'Live', reconnecting: 'Reconnecting…', closed: 'Offline' }[s] || s;
    },
    resync: () => {
      // Refresh rows that were active: their terminal event may have been missed.
      for (const [id, r] of rows) {
        if (r && ACTIVE.has(r.job.status)) api('GET', `/jobs/${id}`).then((j) => r.update(j)).catch(() => {});
      }
      load();
    },
  });
  ctx.onCleanup(() => events.stop());

  await load();
  events.start();

  const demo = form(h('div.grid4',
    field('Steps', h('input', { name: 'steps', type: 'number', min: 1, max: 1000, value: '20', required: true })),
    field('Milliseconds per step', h('input', { name: 'step_ms', type: 'number', min: 0, max: 60000, value: '250', required: true })),
    field('Fail the first attempts', h('input', { name: 'fail_attempts', type: 'number', min: 0, max: 100, value: '0' }),
      'Attempts that fail before one succeeds.'),
    h('div.field.check',
      h('input', { name: 'permanent_fail', type: 'checkbox', id: 'permanent_fail' }),
      h('label', { for: 'permanent_fail' }, 'Fail permanently (goes to the dead-letter queue)'))),
  'Run demo job', async (d) => {
    const payload = { steps: Number(d.get('steps')), step_ms: Number(d.get('step_ms')) };
    const fails = Number(d.get('fail_attempts') || 0);
    if (fails) payload.fail_attempts = fails;
    if (d.get('permanent_fail')) payload.permanent_fail = true;
    const job = await api('POST', '/jobs', { body: { kind: 'demo', payload } });
    add(job, { top: true });
    follow(job.id);
    return `Job ${shortId(job.id)} queued.`;
  });

  const fileInput = h('input', { name: 'archive', type: 'file', accept: '.tar.gz,.tgz,.zip,application/gzip,application/zip', required: true });
  const analyze = form(field('Archive (.tar.gz or .zip)', fileInput, 'Counts files, lines, code and comments per language.'),
    'Upload and analyze', async () => {
      const file = fileInput.files[0];
      if (!file) throw new Error('Choose an archive first.');
      const up = await api('POST', '/uploads', { raw: file });
      const job = await api('POST', '/jobs', { body: { kind: 'analyze', payload: { upload_id: up.id } } });
      add(job, { top: true });
      follow(job.id);
      fileInput.value = '';
      return `Uploaded ${fmtBytes(up.size)}; job ${shortId(job.id)} queued.`;
    });

  return h('section.dashboard',
    h('div.page-head', h('h1', 'Jobs'), live),
    h('div.two',
      h('section.card', { 'aria-labelledby': 'demo-h' }, h('h2', { id: 'demo-h' }, 'Run a demo job'), demo),
      h('section.card', { 'aria-labelledby': 'an-h' }, h('h2', { id: 'an-h' }, 'Analyze an archive'), analyze)),
    h('section', { 'aria-labelledby': 'list-h' },
      h('h2', { id: 'list-h' }, 'Your jobs'), listError, empty, list, more, announcer));
}
