// @lockstep/client (clients/js) against a real node, with the real @stomp/stompjs: run from Node
// (node/library.mjs) and inside headless Chromium (browser/library.mjs serves browser/page.html,
// this file as /scenario.mjs and the library as /lockstep.js). Uses only what both platforms
// have; `./lockstep.js` is shared/lockstep.js in Node and the library itself in the browser.
//
// Steps (`n` is data.n of the `lib.test` events the backend publishes to /team/<team>):
//  a. connect with a token provider (each call hands out the next of cfg.tokens.user0..2);
//     subscribe the team `next`: lockstep.subscribed, fresh;
//  b. publish n=1..3 over HTTP: the handler gets them in order;
//  c. the socket drops (forceDisconnect); n=4..6 are published while it is down; the library
//     reconnects by itself, resumes from n=3's offset (recovered), and the handler gets 4..6
//     then live 7: 1..7 exactly once each, offsets contiguous;
//  d. the connection outlives its token: the library sends the next token over the socket
//     before `exp` (no reconnect), n=8 arrives after the old token's expiry;
//  e. lock(team, item) bound to the session with a 1 s TTL, renewed before expiry (still held
//     past the first grant's end, same fencing token); an item someone else holds is refused
//     with LockstepError lock_held; an admin takes over a lock: onLost says so; release;
//  f. presence lists the user;
//  g. a stored position from another epoch: onReset (not_recovered), then live n=9 on both;
//  h. close(): locks released, socket closed.

import { ScenarioFailure, Waits, showJson } from './common.mjs';
import { Lockstep } from './lockstep.js';

export { makeRedactor } from './common.mjs';

const TYPE = 'lib.test';
let step = 'setup';

function fail(message) {
  throw new ScenarioFailure(`[${step}] ${message}`);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function runScenario({ Client, cfg, fetch, log }) {
  const waits = new Waits(() => step);
  const team = `/team/${cfg.team}`;
  const api = async (method, path, token, body) => {
    const init = { method, headers: { authorization: `Bearer ${token}` } };
    if (body !== undefined) {
      init.headers['content-type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const answer = await fetch(`${cfg.http}${path}`, init);
    const text = await answer.text();
    return { status: answer.status, json: text ? JSON.parse(text) : null };
  };
  const publish = async (n) => {
    const r = await api('POST', '/api/v1/publish', cfg.tokens.publisher, { topic: team, type: TYPE, data: { n } });
    if (r.status !== 202) fail(`publish n=${n}: ${r.status} ${showJson(r.json, 300)}`);
    return r.json;
  };

  let handed = 0;
  let providerFailed = false;
  const userTokens = [cfg.tokens.user0, cfg.tokens.user1, cfg.tokens.user2];
  const connects = [];
  const disconnects = [];
  const errors = [];
  const ls = new Lockstep({
    url: cfg.ws,
    http: cfg.http,
    Client,
    // The provider fails once first (its backend is down): the library retries it.
    token: () => {
      if (!providerFailed) {
        providerFailed = true;
        throw new Error('token backend unavailable');
      }
      return userTokens[Math.min(handed++, userTokens.length - 1)];
    },
    refreshBeforeMs: 2000,
    stomp: { reconnectDelay: 300, heartbeatIncoming: cfg.heartbeat_ms, heartbeatOutgoing: cfg.heartbeat_ms, debug: log },
    onConnect: (frame) => {
      connects.push(frame.headers.session);
      waits.changed();
    },
    onDisconnect: () => {
      disconnects.push(Date.now());
      waits.changed();
    },
    onRefresh: () => waits.changed(),
    onError: (e) => {
      errors.push(e.message);
      log(`library error: ${e.message}`);
    },
  });

  try {
    step = 'a connect and subscribe';
    await waits.wait(ls.connect(), 'CONNECTED');
    const seen = [];
    // Every event of the subscription (presence events too), for the offsets.
    const offsets = [];
    const subscribed = [];
    const resets = [];
    ls.subscribe(
      team,
      (event, meta) => {
        offsets.push(meta.offset);
        if (event.type === TYPE) seen.push({ n: event.data.n, offset: meta.offset, epoch: meta.epoch });
        waits.changed();
      },
      {
        onSubscribed: (p) => {
          subscribed.push(p);
          waits.changed();
        },
        onReset: (r) => {
          resets.push(r);
          waits.changed();
        },
      },
    );
    await waits.until(() => subscribed.length === 1, 'lockstep.subscribed');
    if (subscribed[0].resumedFrom !== null || !subscribed[0].recovered) fail(`a fresh subscription: ${showJson(subscribed[0], 300)}`);

    step = 'b live events';
    for (const n of [1, 2, 3]) await publish(n);
    await waits.until(() => seen.length === 3, () => `n=1..3; got ${showJson(seen, 400)}`);

    step = 'c reconnect and resume';
    ls.stomp.forceDisconnect();
    await waits.until(() => disconnects.length === 1, 'the socket to close');
    for (const n of [4, 5, 6]) await publish(n);
    await waits.until(() => connects.length === 2 && subscribed.length === 2, 'the reconnect and resubscribe');
    await waits.until(() => seen.length === 6, () => `n=4..6 replayed; got ${showJson(seen, 600)}`);
    await publish(7);
    await waits.until(() => seen.length === 7, () => `n=7 live; got ${showJson(seen, 600)}`);
    const ns = seen.map((e) => e.n);
    if (ns.join() !== '1,2,3,4,5,6,7') fail(`events ${ns}, expected 1..7 once each`);
    for (let i = 1; i < offsets.length; i++) {
      if (offsets[i] !== offsets[i - 1] + 1) fail(`offsets not contiguous: ${offsets} (lib.test: ${showJson(seen, 600)})`);
    }
    const resumed = subscribed[1];
    if (!resumed.recovered || !resumed.resumedFrom || resumed.resumedFrom.offset < seen[2].offset) {
      fail(`the resume: ${showJson(resumed, 300)}, expected recovered from offset ${seen[2].offset} or later`);
    }

    step = 'd token refresh over the socket';
    // The reconnect took the second token; the third must arrive over the socket before the
    // second's exp, and the connection must outlive it.
    if (handed !== 2 || ls.refreshed !== 0) fail(`before the refresh: ${handed} tokens handed out, ${ls.refreshed} refreshes (steps a-c took too long?)`);
    const expiry = cfg.expires[1] * 1000;
    await waits.until(() => ls.refreshed >= 1, 'a refresh', Math.max(0, expiry - Date.now()) + 5000);
    if (handed !== 3) fail(`the refresh must take the third token; ${handed} handed out`);
    await sleep(Math.max(0, expiry - Date.now()) + 1000);
    await publish(8);
    await waits.until(() => seen.length === 8, () => `n=8 after the old token's exp; got ${showJson(seen.slice(-3), 300)}`);
    if (connects.length !== 2) fail(`${connects.length} connections: the refresh must not reconnect`);

    step = 'e locks';
    let renewals = 0;
    const lockLost = [];
    const lock = await waits.wait(
      ls.lock(cfg.team, 'lib-item', { ttlMs: 1000, onRenewed: () => { renewals += 1; waits.changed(); }, onLost: (l) => { lockLost.push(l); waits.changed(); } }),
      'lock(lib-item)',
    );
    await waits.until(() => renewals >= 2, 'two renewals', 5000);
    const held = await api('GET', `/api/v1/teams/${cfg.team}/items/lib-item/lock`, cfg.tokens.admin);
    if (held.status !== 200 || held.json.holder !== cfg.user || held.json.token !== lock.token) {
      fail(`renewed lock: ${held.status} ${showJson(held.json, 300)}, expected ${cfg.user}'s token ${lock.token}`);
    }
    const other = await api('POST', `/api/v1/teams/${cfg.team}/items/lib-taken/lock`, cfg.tokens.admin, {});
    if (other.status !== 200) fail(`the admin's lock: ${other.status}`);
    let refused = null;
    try {
      await waits.wait(ls.lock(cfg.team, 'lib-taken'), 'lock(lib-taken)');
    } catch (e) {
      refused = e;
    }
    if (!refused || refused.name !== 'LockstepError' || refused.status !== 409 || refused.code !== 'lock_held') {
      fail(`a held item: ${refused ? `${refused.name} ${refused.status} ${refused.code}` : 'granted'}, expected LockstepError 409 lock_held`);
    }
    const lost = [];
    const doomed = await waits.wait(ls.lock(cfg.team, 'lib-doomed', { ttlMs: 1000, onLost: (l) => { lost.push(l); waits.changed(); } }), 'lock(lib-doomed)');
    const taken = await api('DELETE', `/api/v1/teams/${cfg.team}/items/lib-doomed/lock?force=true`, cfg.tokens.admin);
    if (taken.status !== 200) fail(`takeover: ${taken.status} ${showJson(taken.json, 300)}`);
    await waits.until(() => lost.length === 1, 'onLost after the takeover', 5000);
    if (doomed.held || lost[0].reason !== 'lock_lost') fail(`lost: ${showJson(lost, 300)}`);
    // The socket drops while the lock is held: the server would release it after the session
    // grace (1 s here); the library binds it to the new session, so it outlives that.
    const rebindFrom = connects.length;
    ls.stomp.forceDisconnect();
    await waits.until(() => connects.length === rebindFrom + 1, 'the reconnect with a lock held');
    await sleep(2500);
    const kept = await api('GET', `/api/v1/teams/${cfg.team}/items/lib-item/lock`, cfg.tokens.admin);
    if (kept.status !== 200 || kept.json.token !== lock.token || kept.json.session !== ls.session || lockLost.length) {
      fail(`the lock after a reconnect: ${kept.status} ${showJson(kept.json, 300)}, lost ${showJson(lockLost, 200)}; expected token ${lock.token} on session ${ls.session}`);
    }
    await waits.wait(lock.release(), 'release()');
    const gone = await api('GET', `/api/v1/teams/${cfg.team}/items/lib-item/lock`, cfg.tokens.admin);
    if (gone.status !== 404) fail(`after release: ${gone.status} ${showJson(gone.json, 300)}`);

    step = 'f presence';
    let presence = null;
    for (let i = 0; i < 50; i++) {
      presence = await ls.presence(team);
      if (presence.users?.some((u) => u.user === cfg.user)) break;
      await sleep(100);
    }
    if (!presence.users?.some((u) => u.user === cfg.user)) fail(`presence: ${showJson(presence, 300)}`);

    step = 'g onReset';
    const again = [];
    const reset2 = [];
    ls.subscribe(team, (event) => {
      if (event.type === TYPE) again.push(event.data.n);
      waits.changed();
    }, { from: { offset: 2, epoch: 'not-this-epoch' }, onReset: (r) => { reset2.push(r); waits.changed(); } });
    await waits.until(() => reset2.length === 1, 'onReset for a foreign epoch');
    if (reset2[0].reason !== 'not_recovered') fail(`reset: ${showJson(reset2, 300)}`);
    await publish(9);
    await waits.until(() => again.length === 1 && seen.length === 9, 'n=9 on both subscriptions');
    if (again[0] !== 9 || resets.length !== 0) fail(`after the reset: ${again}, first subscription's resets ${showJson(resets, 300)}`);

    step = 'h a refused subscription ends, the others go on';
    const ended = [];
    ls.subscribe('/team/not-my-team', () => {}, { onEnd: (e) => { ended.push(e); waits.changed(); } });
    await waits.until(() => ended.length === 1, 'onEnd for a foreign team');
    if (ended[0].reason !== 'refused') fail(`onEnd: ${showJson(ended, 300)}`);
    // The server closed the connection with its ERROR; the library reconnects without it.
    const reconnects = connects.length;
    await waits.until(() => connects.length === reconnects + 1 || ls.stomp.connected, 'the reconnect after the refusal');
    await publish(10);
    await waits.until(() => seen.length === 10 && again.length === 2, 'n=10 on both team subscriptions after the refusal');
    if (ls.subscriptions.size !== 2) fail(`${ls.subscriptions.size} subscriptions left, expected the two team ones`);

    step = 'i close';
    await waits.wait(ls.close(), 'close()');
    // The token provider runs out of tokens at the third: any error the library reported
    // (other than the refused SUBSCRIBE above) is a failure.
    if (!errors.some((e) => e.includes('token provider failed'))) fail(`the failing provider was not reported: ${showJson(errors, 400)}`);
    const unexpected = errors.filter((e) => !e.includes('not-my-team') && !e.includes('forbidden') && !e.includes('token provider failed'));
    if (unexpected.length) fail(`library errors: ${showJson(unexpected, 600)}`);
    return { events: seen.length, connections: connects.length, refreshes: ls.refreshed, lock_token: lock.token };
  } catch (e) {
    try {
      await ls.stomp.deactivate({ force: true });
    } catch (_) {
      // best effort
    }
    throw e;
  }
}
