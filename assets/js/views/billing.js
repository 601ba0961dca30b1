// Billing: current plan and status, usage this period, the plans to choose from,
// Subscribe (Stripe Checkout, or the built-in fake Stripe page offline) and Manage (portal).

import { h, notice, fmtDate, fmtMoney, fmtBytes } from '../dom.js';
import { api, session, reloadUser } from '../api.js';

const STATUS = {
  free: 'Free', trialing: 'Trial', active: 'Active', past_due: 'Payment failed',
  canceled: 'Canceled', expired: 'Expired',
};
const PAID = new Set(['active', 'trialing', 'past_due']);

async function entitlement() {
  try {
    return await api('GET', '/billing/subscription');
  } catch (e) {
    if (e.status === 404 && session.user?.plan) return session.user.plan; // older server: /me has it
    throw e;
  }
}

export async function render(ctx) {
  const messages = h('div', { 'aria-live': 'polite' });
  const current = h('div');
  const [plansRes, entRes] = await Promise.allSettled([api('GET', '/billing/plans', { auth: false }), entitlement()]);
  const plans = plansRes.status === 'fulfilled' ? plansRes.value.items : [];
  if (plansRes.status === 'rejected') messages.append(notice('error', `Could not load plans: ${plansRes.reason.detail}`));
  let ent = entRes.status === 'fulfilled' ? entRes.value : null;
  if (entRes.status === 'rejected') messages.append(notice('error', `Could not load your subscription: ${entRes.reason.detail}`));

  const planList = h('div.plans');

  function draw() {
    current.replaceChildren(currentView(ent, plans));
    planList.replaceChildren(...plans.map((p) => planCard(p, ent)));
  }

  async function go(path, body) {
    messages.replaceChildren();
    try {
      const { url } = await api('POST', path, { body });
      location.assign(url);
    } catch (e) {
      messages.replaceChildren(notice('error', e.detail));
      if (e.code === 'already_subscribed') messages.append(manageButton());
    }
  }

  const manageButton = () => h('button', { type: 'button', onclick: () => go('/billing/portal', {}) }, 'Manage subscription');

  function planCard(p, e) {
    const mine = e && e.plan === p.id;
    const l = p.limits || {};
    let action = null;
    if (mine) action = h('span.badge.s-succeeded', 'Your plan');
    else if (p.id !== 'free' && !(e && PAID.has(e.status))) {
      action = h('button.primary', {
        type: 'button', 'aria-label': `Subscribe to ${p.name}`, dataset: { plan: p.id },
        onclick: (ev) => { ev.currentTarget.disabled = true; go('/billing/checkout', { plan: p.id }).finally(() => { ev.target.disabled = false; }); },
      }, 'Subscribe');
    } else if (p.id !== 'free') action = manageButton();
    return h('article.card.plan', { class: mine ? 'card plan mine' : 'card plan', dataset: { plan: p.id } },
      h('h3', p.name),
      h('p.price', fmtMoney(p.price, p.currency), h('small', ` / ${p.interval}`)),
      h('ul.limits',
        h('li', `${num(l.jobs_per_period)} jobs per period`),
        h('li', `${num(l.concurrent_jobs)} jobs at once`),
        h('li', `Uploads up to ${fmtBytes(l.max_upload_bytes)}`),
        p.metered ? h('li', 'Metered usage') : null),
      h('div.actions', action));
  }

  function currentView(e, all) {
    if (!e) return h('p.muted', 'Your subscription is not available right now.');
    const plan = all.find((p) => p.id === e.plan);
    const used = e.usage?.jobs_this_period ?? 0;
    const limit = e.limits?.jobs_per_period ?? 0;
    const rows = [
      ['Plan', plan ? plan.name : e.plan],
      ['Status', h(`span.badge.b-${e.status}`, { dataset: { status: e.status } }, STATUS[e.status] || e.status)],
    ];
    if (e.current_period_end) {
      rows.push([e.cancel_at_period_end ? 'Ends on' : 'Renews on', fmtDate(e.current_period_end)]);
    }
    if (e.usage?.period_start) rows.push(['Period started', fmtDate(e.usage.period_start)]);
    return h('div.current',
      e.status === 'past_due' ? h('div.notice.warn.banner', { role: 'alert' },
        h('strong', 'Your last payment failed. '),
        `Your plan stays active until ${fmtDate(e.grace_until)}. Update your payment method to keep it.`,
        ' ', manageButton()) : null,
      e.cancel_at_period_end ? notice('warn', `Your subscription is canceled and ends on ${fmtDate(e.current_period_end)}.`) : null,
      h('dl.facts', rows.map(([k, v]) => [h('dt', k), h('dd', v)])),
      h('div.usage',
        h('label', { for: 'usage-meter' }, `Jobs this period: ${num(used)} of ${num(limit)}`),
        h('meter', { id: 'usage-meter', min: 0, max: Math.max(limit, 1), value: used, high: Math.max(limit, 1) * 0.8, optimum: 0 })),
      PAID.has(e.status) ? h('div.actions', manageButton()) : null);
  }

  draw();

  const outcome = ctx.query.get('checkout');
  if (outcome === 'success' || outcome === 'complete') {
    messages.append(notice('ok', 'Thank you! Your payment was received; your plan updates as soon as Stripe confirms it.'));
    // The webhook may land a moment after the redirect: poll briefly.
    const until = Date.now() + 30_000;
    const poll = async () => {
      if (!document.body.contains(current) || Date.now() > until) return;
      try { ent = await entitlement(); draw(); } catch { /* keep polling */ }
      if (ent && PAID.has(ent.status)) { reloadUser().catch(() => {}); return; }
      setTimeout(poll, 1000);
    };
    setTimeout(poll, 500);
  } else if (outcome === 'cancel' || outcome === 'canceled') {
    messages.append(notice('warn', 'Checkout was canceled; nothing was charged.'));
  }

  return h('section.billing',
    h('h1', 'Billing'),
    messages,
    h('section.card', { 'aria-labelledby': 'cur-h' }, h('h2', { id: 'cur-h' }, 'Current plan'), current),
    h('section', { 'aria-labelledby': 'plans-h' }, h('h2', { id: 'plans-h' }, 'Plans'),
      plans.length ? planList : h('div.empty', h('p', 'No plans are configured.'))));
}

function num(n) {
  return n === null || n === undefined ? '—' : Number(n).toLocaleString();
}
