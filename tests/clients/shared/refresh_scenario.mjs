// Token refresh over the open socket and the control API's unsubscribe (DESIGN §15) with the
// real @stomp/stompjs, run from Node (node/refresh.mjs) and in headless Chromium
// (browser/refresh.mjs serves browser/page.html, whose `import … from '/scenario.mjs'` it
// answers with this file). Imports only ./common.mjs; uses only what both platforms have.
//
// Config: {http, ws, user, team, team2, tokens: {t0, t1, t2, t3, publisher, control},
// expires: [exp of t0, t1, t2, t3] (Unix seconds)}; t0..t2 carry both teams, t3 only `team`.
//
// Scenario:
//  a. connect with t0 (one stompjs Client for the whole run: it must never reconnect);
//     SUBSCRIBE team and team2 (receipts);
//  b. while a publisher posts `refresh.tick` events (n = 1, 2, …) to team and team2 over HTTP,
//     refresh three times, each before the current token's exp, by SEND to /lockstep/token
//     with the next token in `passcode` and a receipt: t1, t2, then t3 (which drops team2);
//     after t3's receipt, team2's subscription gets `lockstep.unsubscribed` (reason `token`);
//  c. the run goes on past t2's exp (the connection outlived t0, t1 and t2);
//  d. the control API ends the user's team subscription (POST /users/{user}/unsubscribe):
//     team's subscription gets `lockstep.unsubscribed` (reason `revoked`);
//  e. checks: one CONNECTED and no close all along; team received every tick 1..N published
//     before (d), in order, none missing or repeated; team2 every tick up to the refresh to t3,
//     then nothing but its `lockstep.unsubscribed`.

import { ScenarioFailure, Waits, makeConn, makeRedactor, forceClose, showJson } from './common.mjs';

export { makeRedactor };

const TICK = 'refresh.tick';
const UNSUBSCRIBED = 'lockstep.unsubscribed';
const TICK_MS = 100;

let currentStep = 'setup';

function fail(message) {
  throw new ScenarioFailure(`[${currentStep}] ${message}`);
}

function show(value) {
  return showJson(value, 900);
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export async function runRefreshScenario({ Client, cfg, fetch: fetchImpl, log = () => {}, platform }) {
  currentStep = 'setup';
  const waits = new Waits(() => currentStep);
  const conn = makeConn({ Client, cfg, name: 'ana', token: cfg.tokens.t0, waits, log, show, traceWidth: 300 });
  let connects = 0;
  const onConnect = conn.client.onConnect;
  conn.client.onConnect = (frame) => {
    connects += 1;
    onConnect(frame);
  };
  const frames = { team: [], team2: [] };
  const topics = { team: `/team/${cfg.team}`, team2: `/team/${cfg.team2}` };
  let ticking = true;
  let published = 0;
  const errors = [];
  try {
    currentStep = 'a: connect and subscribe';
    conn.client.activate();
    await waits.until(() => conn.connectedFrame !== null, 'CONNECTED');
    for (const name of ['team', 'team2']) {
      const receipt = `r-${name}`;
      conn.client.watchForReceipt(receipt, () => {
        conn.receipts.add(receipt);
        waits.changed();
      });
      conn.client.subscribe(
        topics[name],
        (msg) => {
          frames[name].push({ type: msg.headers['event-type'], body: JSON.parse(msg.body) });
          waits.changed();
        },
        { id: name, receipt },
      );
      await waits.until(() => conn.receipts.has(receipt), `RECEIPT ${receipt}`);
    }

    // The publisher: one tick at a time to both teams, each answered before the next.
    const publisher = (async () => {
      while (ticking) {
        const n = published + 1;
        for (const name of ['team', 'team2']) {
          const res = await fetchImpl(`${cfg.http}/api/v1/publish`, {
            method: 'POST',
            headers: { authorization: `Bearer ${cfg.tokens.publisher}`, 'content-type': 'application/json' },
            body: JSON.stringify({ topic: topics[name], type: TICK, data: { n } }),
          });
          if (res.status !== 202) errors.push(`publish n=${n} to ${name}: HTTP ${res.status} ${await res.text()}`);
        }
        published = n;
        await delay(TICK_MS);
      }
    })();

    currentStep = 'b: three refreshes';
    let team2Until = null;
    for (const [i, next] of [['1', 't1'], ['2', 't2'], ['3', 't3']]) {
      // Refresh two seconds before the current token's exp.
      const exp = cfg.expires[Number(i) - 1] * 1000;
      const wait = exp - 2000 - Date.now();
      if (wait > 0) await delay(wait);
      if (Date.now() >= exp) fail(`token t${Number(i) - 1} already expired before its refresh`);
      const receipt = `refresh-${i}`;
      conn.client.watchForReceipt(receipt, () => {
        conn.receipts.add(receipt);
        waits.changed();
      });
      const before = published;
      conn.client.publish({ destination: '/lockstep/token', headers: { passcode: cfg.tokens[next], receipt } });
      await waits.until(() => conn.receipts.has(receipt), `RECEIPT ${receipt} for the refresh to ${next}`);
      log(`refreshed to ${next} after tick ${before}`);
      if (next === 't3') team2Until = before;
    }
    await waits.until(
      () => frames.team2.some((f) => f.type === UNSUBSCRIBED),
      'lockstep.unsubscribed on team2 after the refresh that dropped it',
    );

    currentStep = "c: past t2's exp";
    const pastT2 = cfg.expires[2] * 1000 + 500 - Date.now();
    if (pastT2 > 0) await delay(pastT2);
    const ticksBeforeControl = published;
    await waits.until(
      () => frames.team.filter((f) => f.type === TICK).length >= ticksBeforeControl,
      () => `team ticks up to ${ticksBeforeControl} (have ${frames.team.length})`,
    );
    ticking = false;
    await publisher;
    if (errors.length) fail(errors.join('; '));
    const lastTick = published;
    await waits.until(
      () => frames.team.filter((f) => f.type === TICK).length >= lastTick,
      () => `team ticks up to ${lastTick} (have ${frames.team.length})`,
    );

    currentStep = 'd: control API unsubscribe';
    const res = await fetchImpl(`${cfg.http}/api/v1/users/${cfg.user}/unsubscribe`, {
      method: 'POST',
      headers: { authorization: `Bearer ${cfg.tokens.control}`, 'content-type': 'application/json' },
      body: JSON.stringify({ topic: topics.team }),
    });
    if (res.status !== 200) fail(`unsubscribe: HTTP ${res.status} ${await res.text()}`);
    await waits.until(() => frames.team.some((f) => f.type === UNSUBSCRIBED), 'lockstep.unsubscribed on team');

    currentStep = 'e: checks';
    if (connects !== 1) fail(`stompjs connected ${connects} times; a refresh must not reconnect`);
    if (conn.closeEvent) fail(`the WebSocket closed: ${show(conn.closeEvent)}`);
    const ticks = frames.team.filter((f) => f.type === TICK).map((f) => f.body.data.n);
    const want = Array.from({ length: lastTick }, (_, k) => k + 1);
    if (show(ticks) !== show(want)) fail(`team ticks ${show(ticks)}, want 1..${lastTick}`);
    const last = frames.team[frames.team.length - 1];
    if (last.type !== UNSUBSCRIBED || last.body.data.reason !== 'revoked') fail(`team's last frame ${show(last)}`);
    const t2 = frames.team2;
    const t2end = t2.findIndex((f) => f.type === UNSUBSCRIBED);
    if (t2end !== t2.length - 1) fail(`team2 got frames after its lockstep.unsubscribed: ${show(t2.slice(t2end))}`);
    if (t2[t2end].body.data.reason !== 'token') fail(`team2's unsubscribed reason ${show(t2[t2end].body)}`);
    const t2ticks = t2.slice(0, t2end).map((f) => f.body.data.n);
    const t2want = Array.from({ length: t2ticks.length }, (_, k) => k + 1);
    if (show(t2ticks) !== show(t2want) || t2ticks.length < team2Until) {
      fail(`team2 ticks ${show(t2ticks)}: want 1..n with n >= ${team2Until}`);
    }
    const outlived = Math.round(Date.now() / 1000 - cfg.expires[0]);

    currentStep = 'done';
    conn.closing = true;
    await conn.client.deactivate();
    return { platform, refreshes: 3, ticks: lastTick, team2_ticks: t2ticks.length, outlived_first_token_s: outlived };
  } finally {
    ticking = false;
    forceClose([conn]);
  }
}

export const runScenario = runRefreshScenario;
