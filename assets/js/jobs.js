// Rendering of jobs shared by the dashboard, the job page and the admin queue: a status
// badge, a live progress bar, and retry/cancel buttons.

import { h, fmtDate } from './dom.js';
import { api } from './api.js';

const LABELS = {
  queued: 'Queued', running: 'Running', retrying: 'Retrying', succeeded: 'Succeeded',
  dead: 'Failed', canceled: 'Canceled',
};
export const ACTIVE = new Set(['queued', 'running', 'retrying']);

export function badge(status) {
  return h(`span.badge.s-${status}`, { dataset: { status } }, LABELS[status] || status);
}

export function shortId(id) {
  return id.length > 10 ? `${id.slice(0, 4)}…${id.slice(-6)}` : id;
}

export function describe(job) {
  const p = job.payload || {};
  if (job.kind === 'demo') {
    const bits = [`${p.steps} ${p.steps === 1 ? 'step' : 'steps'} × ${p.step_ms} ms`];
    if (p.fail_attempts) bits.push(`fails ${p.fail_attempts}×`);
    if (p.permanent_fail) bits.push('fails permanently');
    return bits.join(', ');
  }
  if (job.kind === 'analyze') return `archive ${shortId(String(p.upload_id || ''))}`;
  return '';
}

/**
 * A job row that updates in place: `row.update(partialJob)` from SSE events.
 * `onChange(job)` is called after a button changed the job on the server.
 */
export function jobRow(job, { onChange, showOwner = false, actions = true, detailLink = true } = {}) {
  const state = { ...job };
  const el = h('li.job', { dataset: { jobId: job.id } });
  const bar = h('progress', { max: 100, value: job.progress?.pct ?? 0, 'aria-label': `Progress of job ${shortId(job.id)}` });
  const pct = h('span.pct', { 'aria-hidden': 'true' });
  const message = h('span.message');
  const badgeBox = h('span.badge-box');
  const meta = h('span.meta');
  const error = h('p.job-error', { hidden: true });
  const buttons = h('div.buttons');

  function draw() {
    const s = state.status;
    const value = s === 'succeeded' ? 100 : (state.progress?.pct ?? 0);
    bar.value = value;
    bar.setAttribute('aria-valuetext', `${value}%${state.progress?.message ? `, ${state.progress.message}` : ''}`);
    pct.textContent = `${value}%`;
    message.textContent = state.progress?.message || '';
    badgeBox.replaceChildren(badge(s));
    meta.textContent = `attempt ${state.attempt}/${state.max_attempts} · ${fmtDate(state.created_at)}`;
    error.hidden = !state.error || !['dead', 'retrying', 'canceled'].includes(s);
    error.textContent = state.error ? `Error: ${state.error}` : '';
    el.dataset.status = s;
    buttons.replaceChildren(...(actions ? actionButtons() : []));
  }

  function actionButtons() {
    const b = [];
    const s = state.status;
    if (detailLink && s === 'succeeded' && state.result !== null && state.result !== undefined) {
      b.push(h('a.button.small', { href: `#/jobs/${state.id}` }, 'View result'));
    } else if (detailLink) {
      b.push(h('a.button.small.ghost', { href: `#/jobs/${state.id}` }, 'Details'));
    }
    if (ACTIVE.has(s)) b.push(act('Cancel', 'cancel'));
    if (s === 'dead' || s === 'canceled') b.push(act('Retry', 'retry'));
    return b;
  }

  function act(label, verb) {
    return h('button.small', {
      type: 'button',
      'aria-label': `${label} job ${shortId(state.id)}`,
      onclick: async (ev) => {
        ev.currentTarget.disabled = true;
        try {
          const j = await api('POST', `/jobs/${state.id}/${verb}`, { body: {} });
          update(j);
          onChange?.(j);
        } catch (e) {
          error.hidden = false;
          error.setAttribute('role', 'alert');
          error.textContent = e.detail;
          ev.target.disabled = false;
        }
      },
    }, label);
  }

  function update(part) {
    if (part.pct !== undefined) state.progress = { pct: part.pct, message: part.message };
    for (const k of ['status', 'attempt', 'result', 'error', 'progress', 'max_attempts', 'finished_at']) {
      if (part[k] !== undefined) state[k] = part[k];
    }
    draw();
  }

  el.append(
    h('div.job-head',
      h('strong.kind', job.kind),
      h('code.id', { title: job.id }, shortId(job.id)),
      badgeBox,
      showOwner && job.user_id ? h('span.owner', job.user_id) : null),
    h('p.desc', describe(job)),
    h('div.progress-line', bar, pct, message),
    h('div.job-foot', meta, buttons),
    error);
  draw();
  el.update = update;
  el.job = state;
  return el;
}
