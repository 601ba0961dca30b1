// Public pages: sign in, register, password reset, email verification, OAuth completion.

import { h, field, notice, clear } from '../dom.js';
import { api, login, register as registerUser, exchangeOAuthCode } from '../api.js';

function card(title, intro, ...body) {
  return h('section.card.auth',
    h('div.brand-big', h('span.logo', { 'aria-hidden': 'true' }, '⚡'), 'warpbase'),
    h('h1', title),
    intro ? h('p.muted', intro) : null,
    ...body);
}

/** A form whose submit handler shows errors from problem+json and disables while busy. */
export function form(fields, submitLabel, onSubmit, { extra } = {}) {
  const errors = h('div.form-errors', { 'aria-live': 'assertive' });
  const button = h('button.primary', { type: 'submit' }, submitLabel);
  const f = h('form', { novalidate: false }, fields, errors, h('div.actions', button, extra));
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    clear(errors);
    button.disabled = true;
    f.setAttribute('aria-busy', 'true');
    try {
      const done = await onSubmit(new FormData(f), f);
      if (done) errors.append(done instanceof Node ? done : notice('ok', done));
    } catch (e) {
      errors.append(notice('error', e.detail || e.message));
      const bad = f.querySelector('input');
      if (e.code === 'invalid_credentials' || e.code === 'email_taken') bad?.focus();
    } finally {
      button.disabled = false;
      f.removeAttribute('aria-busy');
    }
  });
  return f;
}

const input = (name, type, attrs = {}) => h('input', { name, type, required: true, ...attrs });

async function providerButtons() {
  const box = h('div.providers');
  try {
    const { items = [] } = await api('GET', '/auth/providers', { auth: false });
    if (items.length) {
      box.append(h('p.or', h('span', 'or')));
      for (const p of items) {
        box.append(h('a.button.provider', {
          href: `/api/v1/auth/oauth/${encodeURIComponent(p.id)}/authorize`,
          dataset: { provider: p.id },
        }, `Continue with ${p.name}`));
      }
    }
  } catch { /* no providers endpoint or none enabled: password only */ }
  return box;
}

export async function signIn(ctx) {
  const f = form([
    field('Email', input('email', 'email', { autocomplete: 'username', autofocus: true })),
    field('Password', input('password', 'password', { autocomplete: 'current-password' })),
  ], 'Sign in', async (d) => {
    await login(d.get('email'), d.get('password'));
  }, { extra: h('a', { href: '#/forgot' }, 'Forgot your password?') });
  return card('Sign in', null, f, await providerButtons(),
    h('p.switch', 'New here? ', h('a', { href: '#/register' }, 'Create an account')));
}

export async function register() {
  const f = form([
    field('Name (optional)', h('input', { name: 'name', type: 'text', autocomplete: 'name', maxlength: 200 })),
    field('Email', input('email', 'email', { autocomplete: 'email' })),
    field('Password', input('password', 'password', { autocomplete: 'new-password', minlength: 10 }),
      'At least 10 characters.'),
  ], 'Create account', async (d) => {
    await registerUser(d.get('email'), d.get('password'), (d.get('name') || '').trim() || undefined);
  });
  return card('Create your account', 'The first account on a new server becomes its admin.', f,
    await providerButtons(),
    h('p.switch', 'Already have an account? ', h('a', { href: '#/signin' }, 'Sign in')));
}

export async function forgot() {
  const f = form([
    field('Email', input('email', 'email', { autocomplete: 'email' })),
  ], 'Send reset link', async (d) => {
    await api('POST', '/auth/password-reset/request', { body: { email: d.get('email') }, auth: false });
    return 'If an account exists for this address, a reset link is on its way. It is valid for one hour.';
  });
  return card('Reset your password', 'We will email you a link to choose a new password.', f,
    h('p.switch', h('a', { href: '#/signin' }, 'Back to sign in')));
}

export async function reset(ctx) {
  const token = ctx.query.get('token');
  if (!token) {
    return card('Reset your password', null,
      notice('error', 'This reset link is incomplete. Request a new one.'),
      h('p.switch', h('a', { href: '#/forgot' }, 'Request a new link')));
  }
  const f = form([
    field('New password', input('new_password', 'password', { autocomplete: 'new-password', minlength: 10 }),
      'At least 10 characters.'),
    field('Repeat the new password', input('confirm', 'password', { autocomplete: 'new-password', minlength: 10 })),
  ], 'Set new password', async (d, formEl) => {
    if (d.get('new_password') !== d.get('confirm')) {
      throw new Error('The two passwords do not match.');
    }
    try {
      await api('POST', '/auth/password-reset', { body: { token, new_password: d.get('new_password') }, auth: false });
    } catch (e) {
      if (e.code === 'invalid_grant') e.detail = 'This reset link has expired or was already used. Request a new one.';
      throw e;
    }
    formEl.querySelectorAll('input, button').forEach((el) => { el.disabled = true; });
    return h('div', notice('ok', 'Your password was changed and every session was signed out.'),
      h('p', h('a.button', { href: '#/signin' }, 'Sign in')));
  });
  return card('Choose a new password', null, f);
}

export async function verify(ctx) {
  const token = ctx.query.get('token');
  let result;
  if (!token) {
    result = notice('error', 'This verification link is incomplete.');
  } else {
    try {
      await api('POST', '/auth/verify-email', { body: { token }, auth: false });
      result = notice('ok', 'Your email address is confirmed. Thank you!');
    } catch (e) {
      result = notice('error', e.code === 'invalid_grant'
        ? 'This link has expired or was already used. Send a new one from your account page.'
        : e.detail);
    }
  }
  return card('Email verification', null, result,
    h('p.switch', h('a', { href: '#/' }, 'Continue to warpbase')));
}

export async function oauthComplete(ctx) {
  const code = ctx.query.get('code');
  // Drop the one-time code from the address bar and history right away.
  history.replaceState(null, '', '#/auth/complete');
  if (!code) return card('Signing in', null, notice('error', 'The sign-in link is incomplete.'), backToSignIn());
  try {
    await exchangeOAuthCode(code);
    // The session listener moves on to the dashboard.
    return card('Signing in', null, notice('ok', 'Signed in. One moment…'));
  } catch (e) {
    const text = e.code === 'invalid_grant'
      ? 'This sign-in link has expired or was already used. Please try again.'
      : e.code === 'invalid_state' ? OAUTH_ERRORS.invalid_state : e.detail;
    return card('Sign-in failed', null, notice('error', text), backToSignIn());
  }
}

const OAUTH_ERRORS = {
  invalid_state: 'The sign-in took too long or was started in another window. Please try again.',
  account_exists: 'An account with this email already exists. Sign in with your password, then link this provider from your Account page.',
  access_denied: 'The provider did not grant access.',
  // Static text on purpose: the `detail` in the URL could be anyone's.
  provider_error: 'The provider reported an error, or has not verified your email address yet (verify it at the provider first). Please try again later.',
  identity_in_use: 'This provider account is already linked to another warpbase account.',
  already_linked: 'Your account already has an identity from this provider. Unlink it first.',
  account_disabled: 'This account is disabled. Contact the administrator.',
  internal: 'Something went wrong on our side. Please try again.',
};

export async function oauthError(ctx) {
  const code = ctx.query.get('code') || 'unknown';
  const text = OAUTH_ERRORS[code] || `Sign-in with the provider failed (${code}).`;
  return card('Sign-in failed', null, notice('error', text), backToSignIn());
}

const backToSignIn = () => h('p.switch', h('a', { href: '#/signin' }, 'Back to sign in'));
