// One job: its state (live until it ends), attempt history, and its result. An `analyze`
// result is shown as a per-language table and a bar chart drawn in SVG.

import { h, s, notice, fmtDate } from '../dom.js';
import { api } from '../api.js';
import { LiveEvents } from '../events.js';
import { jobRow, ACTIVE } from '../jobs.js';

export async function render(ctx) {
  const [id] = ctx.params;
  let job;
  try {
    job = await api('GET', `/jobs/${id}`);
  } catch (e) {
    return h('section', h('h1', 'Job'), notice('error', e.detail), h('p', h('a', { href: '#/' }, 'Back to your jobs')));
  }
  const resultBox = h('div.result');
  const attemptsBox = h('div');
  const row = jobRow(job, { onChange: (j) => refresh(j), detailLink: false });
  const wrap = h('ul.jobs.single', row);

  function showResult(j) {
    resultBox.replaceChildren(...resultView(j));
  }
  async function loadAttempts() {
    try {
      const { items } = await api('GET', `/jobs/${id}/attempts`);
      attemptsBox.replaceChildren(items.length
        ? h('div.table-wrap', h('table',
          h('caption', 'Attempts'),
          h('thead', h('tr', ['#', 'Started', 'Finished', 'Outcome', 'Error'].map((t) => h('th', { scope: 'col' }, t)))),
          h('tbody', items.map((a) => h('tr',
            h('td', a.attempt), h('td', fmtDate(a.started_at)), h('td', fmtDate(a.finished_at)),
            h('td', a.outcome), h('td.wrap', a.error || '—'))))))
        : h('p.muted', 'No finished attempts yet.'));
    } catch { attemptsBox.replaceChildren(); }
  }
  function refresh(j) {
    showResult(j);
    loadAttempts();
    if (ACTIVE.has(j.status)) follow();
  }

  let events = null;
  function follow() {
    events?.stop();
    events = new LiveEvents(`/jobs/${id}/events`, {
      state: (d) => row.update(d),
      progress: (d) => row.update(d),
      done: async (d) => {
        row.update(d);
        try { refresh(await api('GET', `/jobs/${id}`)); } catch { showResult({ ...row.job, ...d }); }
      },
    });
    events.start();
  }
  ctx.onCleanup(() => events?.stop());

  showResult(job);
  loadAttempts();
  if (ACTIVE.has(job.status)) follow();

  return h('section.job-page',
    h('p.crumbs', h('a', { href: '#/' }, '← All jobs')),
    h('h1', `${job.kind} job`),
    wrap,
    h('h2', 'Result'), resultBox,
    h('h2', 'History'), attemptsBox);
}

function resultView(job) {
  if (job.status !== 'succeeded') {
    if (job.status === 'dead') return [notice('error', `This job failed: ${job.error || 'no details'}`)];
    if (job.status === 'canceled') return [h('p.muted', 'This job was canceled.')];
    return [h('p.muted', 'The result appears here when the job finishes.')];
  }
  const r = job.result;
  if (r && Array.isArray(r.languages)) return analyzeView(r);
  return [h('pre.json', JSON.stringify(r, null, 2))];
}

function analyzeView(r) {
  const langs = [...r.languages].sort((a, b) => b.lines - a.lines);
  if (!langs.length) return [h('div.empty', h('p', 'No source files were recognised in this archive.'))];
  const num = (n) => Number(n || 0).toLocaleString();
  const t = r.totals || {};
  const table = h('div.table-wrap', h('table.stats',
    h('caption', 'Lines per language'),
    h('thead', h('tr', ['Language', 'Files', 'Lines', 'Code', 'Comments', 'Blanks']
      .map((x, i) => h('th', { scope: 'col', class: i ? 'num' : null }, x)))),
    h('tbody', langs.map((l) => h('tr',
      h('th', { scope: 'row' }, l.name),
      [l.files, l.lines, l.code, l.comments, l.blanks].map((v) => h('td.num', num(v)))))),
    h('tfoot', h('tr', h('th', { scope: 'row' }, 'Total'),
      [t.files, t.lines, t.code, t.comments, t.blanks].map((v) => h('td.num', num(v)))))));
  const skipped = r.skipped_entries ? h('p.muted', `${r.skipped_entries} archive entries were skipped.`) : null;
  return [barChart(langs), table, skipped];
}

/** A horizontal stacked bar chart (code / comments / blanks per language), built with DOM APIs. */
export function barChart(langs) {
  const top = langs.slice(0, 12);
  const max = Math.max(1, ...top.map((l) => l.lines));
  const labelW = 130;
  const barW = 420;
  const rowH = 28;
  const width = labelW + barW + 70;
  const height = top.length * rowH + 34;
  const svg = s('svg', {
    viewBox: `0 0 ${width} ${height}`, role: 'img', class: 'chart',
    'aria-labelledby': 'chart-title chart-desc',
  });
  svg.append(
    s('title', { id: 'chart-title' }, 'Lines per language'),
    s('desc', { id: 'chart-desc' }, top.map((l) => `${l.name}: ${l.lines} lines`).join('; ')));
  top.forEach((l, i) => {
    const y = i * rowH + 4;
    const g = s('g', { class: 'bar' });
    g.append(s('text', { x: labelW - 8, y: y + 15, 'text-anchor': 'end', class: 'label' }, l.name));
    let x = labelW;
    for (const [part, cls] of [['code', 'code'], ['comments', 'comments'], ['blanks', 'blanks']]) {
      const w = ((l[part] || 0) / max) * barW;
      if (w > 0) {
        g.append(s('rect', { x, y, width: Math.max(w, 1), height: rowH - 8, class: cls, rx: 2 },
          s('title', {}, `${l.name} ${part}: ${l[part]}`)));
        x += w;
      }
    }
    g.append(s('text', { x: x + 6, y: y + 15, class: 'value' }, Number(l.lines).toLocaleString()));
    svg.append(g);
  });
  const ly = top.length * rowH + 18;
  let lx = labelW;
  for (const [cls, name] of [['code', 'code'], ['comments', 'comments'], ['blanks', 'blank']]) {
    svg.append(s('rect', { x: lx, y: ly - 9, width: 10, height: 10, class: cls }),
      s('text', { x: lx + 14, y: ly, class: 'legend' }, name));
    lx += 90;
  }
  return h('figure.chart-box', svg);
}
