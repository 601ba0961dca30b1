// Live job events over SSE. EventSource cannot send an Authorization header, so each
// connection first gets a single-use ticket (POST /events/ticket). A ticket cannot be
// reused, so the browser's own auto-reconnect would fail: on any error we close the
// source and reconnect ourselves with a fresh ticket, backing off up to 15 s. A new
// EventSource cannot send Last-Event-ID either, so the last id we saw goes in the query
// (`last_event_id`): the server replays what we missed, or sends `resync` first when it
// cannot (then the view re-reads its list). A stream ends with `reconnect` when the
// access token it was opened with expires: we reconnect at once (the ticket request
// refreshes the token), and a revoked session makes that ticket request fail.

import { api, session } from './api.js';

export class LiveEvents {
  /**
   * @param {string} path  '/events' (all of the user's jobs) or '/jobs/{id}/events'
   * @param {object} handlers  {state, progress, done, status(connected|reconnecting|closed), resync}
   */
  constructor(path, handlers) {
    this.path = path;
    this.on = handlers;
    this.es = null;
    this.stopped = false;
    this.delay = 1000;
    this.retryTimer = null;
    this.connects = 0;
    this.lastId = null;
  }

  async start() {
    if (this.stopped) return;
    let ticket;
    try {
      ({ ticket } = await api('POST', '/events/ticket', { body: {} }));
    } catch (e) {
      // Signed out: the app handles it. Still signed in (a token was being rotated): retry.
      if (e.status === 401 && !session.signedIn) { this.stop(); return; }
      this.retry();
      return;
    }
    if (this.stopped) return;
    let url = `/api/v1${this.path}?ticket=${encodeURIComponent(ticket)}`;
    if (this.lastId) url += `&last_event_id=${encodeURIComponent(this.lastId)}`;
    const es = new EventSource(url);
    this.es = es;
    es.addEventListener('open', () => {
      this.delay = 1000;
      this.connects += 1;
      this.on.status?.('connected');
      // After a drop without any event id to resume from we may have missed terminal
      // events: let the view re-read the list (with an id the server says `resync`).
      if (this.connects > 1 && !this.lastId) this.on.resync?.();
    });
    es.addEventListener('resync', () => this.on.resync?.());
    es.addEventListener('reconnect', () => {
      // The access token expired: a fresh ticket now, resuming after lastId.
      if (this.stopped) return;
      es.close();
      clearTimeout(this.retryTimer);
      this.start();
    });
    for (const type of ['state', 'progress', 'done']) {
      es.addEventListener(type, (ev) => {
        this.lastId = ev.lastEventId || this.lastId;
        let data;
        try { data = JSON.parse(ev.data); } catch { return; }
        this.on[type]?.(data);
        if (type === 'done' && this.path !== '/events') {
          // A per-job stream ends after `done`; don't treat its close as a drop.
          this.stop();
        }
      });
    }
    es.addEventListener('error', () => {
      if (this.stopped) return;
      es.close();
      this.retry();
    });
  }

  retry() {
    if (this.stopped) return;
    this.on.status?.('reconnecting');
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.start(), this.delay);
    this.delay = Math.min(this.delay * 2, 15_000);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this.es?.close();
    this.on.status?.('closed');
  }
}
