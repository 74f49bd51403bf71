// Drives the dashboard the way an operator would, in Debian's headless Chromium, and prints a
// JSON report as its last line. Run by tests/dashboard.rs, which starts Switchyard and checks
// the outcome through the admin API.
//
// Environment:
//   SWITCHYARD_URL          http://127.0.0.1:PORT
//   SWITCHYARD_ADMIN_TOKEN  the admin token
//   SWITCHYARD_WRITE_KEY    a source's write key (to send an event for the live stream)
//   DELIVERED_DESTINATION   a destination that delivers
//   DEAD_DESTINATION        a destination with dead letters
//   FLAKY_DESTINATION       a destination whose first attempt of EVENT_ID failed (500)
//   EVENT_ID                a messageId sent before the run
//   EVENT_USER              the userId of that event
//   REPLAY_ID               a replay started before the run (of DELIVERED_DESTINATION)
//   SCREENSHOT              where to save the overview's screenshot (PNG); the destination
//                           page's and the event path's go next to it (-destination, -event)
//   CHROMIUM                the browser (default /usr/bin/chromium)
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};

const base = env('SWITCHYARD_URL');
const token = env('SWITCHYARD_ADMIN_TOKEN');
const writeKey = env('SWITCHYARD_WRITE_KEY');
const delivered = env('DELIVERED_DESTINATION');
const dead = env('DEAD_DESTINATION');
const flaky = env('FLAKY_DESTINATION');
const eventId = env('EVENT_ID');
const eventUser = env('EVENT_USER');
const replayId = env('REPLAY_ID');
const screenshot = env('SCREENSHOT');
const sibling = (suffix) => screenshot.replace(/\.png$/, `-${suffix}.png`);
const executablePath = env('CHROMIUM', '/usr/bin/chromium');
const TIMEOUT = 20_000;

const step = (text) => console.log(`step: ${text}`);

const browser = await chromium.launch({
  executablePath,
  headless: true,
  // This machine has no network but loopback: keep Chromium from trying to reach Google.
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 1000 } });
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const requested = [];
  page.on('request', (request) => requested.push(request.url()));
  // Every answer >= 400 and every request that failed outright. The one expected: the refused
  // sign-in below, a 401 (which Chromium also logs as a failed resource load).
  const failedLoads = [];
  page.on('response', (response) => {
    if (response.status() >= 400) failedLoads.push(`${response.status()} ${response.request().method()} ${response.url()}`);
  });
  page.on('requestfailed', (request) => failedLoads.push(`failed (${request.failure()?.errorText}) ${request.method()} ${request.url()}`));
  const resourceErrors = [];
  const consoleErrors = [];
  page.on('console', (message) => {
    if (message.type() !== 'error') return;
    if (message.text().startsWith('Failed to load resource')) resourceErrors.push(`${message.text()} (${message.location().url})`);
    else consoleErrors.push(message.text());
  });
  page.on('pageerror', (error) => consoleErrors.push(error.message));

  step('open the dashboard: it asks for the token');
  await page.goto(`${base}/admin`);
  await page.locator('#login').waitFor({ state: 'visible' });

  step('a wrong token is refused');
  await page.fill('#token', 'not-the-token');
  await page.click('#login-form button[type=submit]');
  await page.waitForFunction(() => document.querySelector('#login-error').textContent.length > 0);
  const refusal = await page.textContent('#login-error');

  step('sign in');
  await page.fill('#token', token);
  await page.click('#login-form button[type=submit]');
  await page.locator('#app').waitFor({ state: 'visible' });

  step(`a delivered event is counted for ${delivered}`);
  const deliveredCell = page.locator(`tr[data-destination="${delivered}"] td[data-field="delivered"]`);
  await page.waitForFunction(
    (name) => {
      const cell = document.querySelector(`tr[data-destination="${name}"] td[data-field="delivered"]`);
      return cell && Number(cell.textContent.replace(/[^0-9]/g, '')) > 0;
    },
    delivered,
  );
  const deliveredCount = Number((await deliveredCell.textContent()).replace(/[^0-9]/g, ''));

  step('the token is kept in this tab only');
  const storage = await page.evaluate(() => ({
    session: sessionStorage.getItem('switchyard.adminToken'),
    local: localStorage.length,
    cookies: document.cookie,
  }));
  if (storage.session !== token) throw new Error('the token is not in sessionStorage');
  if (storage.local !== 0 || storage.cookies !== '') throw new Error(`the token leaked into ${JSON.stringify(storage)}`);

  step(`replay one of ${dead}'s dead letters`);
  await page.waitForFunction((name) => document.querySelector('#dead-destination').value === name, dead);
  const firstRow = page.locator('#dead-letters tbody tr[data-id]').first();
  await firstRow.waitFor();
  const deadBefore = await page.locator('#dead-letters tbody tr[data-id]').count();
  const replayedId = Number(await firstRow.getAttribute('data-id'));
  await firstRow.locator('button.replay').click();
  await page.waitForFunction(() => /Requeued 1 dead letter/.test(document.querySelector('#replay-result').textContent));
  await page.locator(`#dead-letters tbody tr[data-id="${replayedId}"]`).waitFor({ state: 'detached' });

  step('an accepted event shows up in the live stream');
  await page.waitForFunction(() => document.querySelector('#live-state').textContent === 'connected');
  const messageId = `live-${Date.now()}`;
  const sent = await fetch(`${base}/v1/track`, {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      Authorization: `Basic ${Buffer.from(`${writeKey}:`).toString('base64')}`,
    },
    body: JSON.stringify({ userId: 'u-live', event: 'Checkout Started', messageId, properties: { step: 1 } }),
  });
  if (!sent.ok) throw new Error(`ingest answered ${sent.status}`);
  await page.locator(`#live-events li[data-message-id="${messageId}"]`).waitFor();
  const liveRoutes = await page.locator(`#live-events li[data-message-id="${messageId}"] .routes-live li[data-route]`)
    .evaluateAll((items) => items.map((item) => ({ destination: item.dataset.route, state: item.dataset.state })));

  step(`replay ${replayId} is listed with its progress and state`);
  const replayRow = `#replays tr[data-replay="${replayId}"]`;
  await page.waitForFunction((row) => {
    const bar = document.querySelector(`${row} progress`);
    return bar && bar.max > 0 && bar.value === bar.max
      && document.querySelector(`${row} td[data-field="state"]`)?.textContent === 'done';
  }, replayRow);
  const replayOverview = await page.evaluate((row) => {
    const bar = document.querySelector(`${row} progress`);
    return {
      destination: document.querySelector(`${row} td[data-field="destination"]`).textContent,
      state: document.querySelector(`${row} td[data-field="state"]`).textContent,
      value: bar.value,
      max: bar.max,
      label: bar.getAttribute('aria-label'),
    };
  }, replayRow);

  step('wait for a second refresh, so throughput has a value, then take the screenshot');
  await page.waitForFunction(
    (name) => /\/s$/.test(document.querySelector(`tr[data-destination="${name}"] td[data-field="throughput"]`)?.textContent ?? ''),
    delivered,
  );
  await page.screenshot({ path: screenshot, fullPage: true });

  const send = async (messageId) => {
    const answer = await fetch(`${base}/v1/track`, {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        Authorization: `Basic ${Buffer.from(`${writeKey}:`).toString('base64')}`,
      },
      body: JSON.stringify({ userId: 'u-pause', event: 'Order Completed', messageId }),
    });
    if (!answer.ok) throw new Error(`ingest answered ${answer.status}`);
  };
  const cellNumber = (name, field) => page.evaluate(([n, f]) =>
    Number(document.querySelector(`tr[data-destination="${n}"] td[data-field="${f}"]`)?.textContent.replace(/[^0-9]/g, '') ?? NaN),
  [name, field]);

  step(`the sparkline of ${delivered} has data points`);
  await page.waitForFunction((name) =>
    Number(document.querySelector(`tr[data-destination="${name}"] svg.spark`)?.dataset.points ?? 0) > 0, delivered);
  const sparkPoints = Number(await page.getAttribute(`tr[data-destination="${delivered}"] svg.spark`, 'data-points'));

  step(`pause ${delivered} with its button: events queue`);
  await page.click(`button[data-pause="${delivered}"]`);
  await page.waitForFunction((name) =>
    document.querySelector(`button[data-pause="${name}"]`)?.getAttribute('aria-pressed') === 'true', delivered);
  const deliveredBeforePause = await cellNumber(delivered, 'delivered');
  const pausedMessageId = `paused-${Date.now()}`;
  await send(pausedMessageId);
  await page.waitForFunction((name) =>
    Number(document.querySelector(`tr[data-destination="${name}"] td[data-field="queued"]`)?.textContent.replace(/[^0-9]/g, '') ?? 0) > 0, delivered);
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const deliveredWhilePaused = await cellNumber(delivered, 'delivered');
  if (deliveredWhilePaused !== deliveredBeforePause) throw new Error(`a paused destination delivered (${deliveredBeforePause} -> ${deliveredWhilePaused})`);

  step(`resume ${delivered}: the queue drains`);
  await page.click(`button[data-pause="${delivered}"]`);
  await page.waitForFunction((name) =>
    document.querySelector(`button[data-pause="${name}"]`)?.getAttribute('aria-pressed') === 'false', delivered);
  await page.waitForFunction(([name, before]) =>
    Number(document.querySelector(`tr[data-destination="${name}"] td[data-field="delivered"]`)?.textContent.replace(/[^0-9]/g, '') ?? 0) > before,
  [delivered, deliveredBeforePause]);

  step(`find ${eventId}: a failed attempt, then the delivery`);
  await page.fill('#event-id', eventId);
  await page.press('#event-id', 'Enter');
  const route = page.locator(`#event-path li[data-route="${flaky}"]`);
  await route.waitFor();
  const routeState = await route.getAttribute('data-state');
  const attempts = await route.locator('li[data-attempt]').evaluateAll((items) =>
    items.map((item) => ({ failed: item.classList.contains('failed'), text: item.textContent })));
  await page.locator('#event-path').screenshot({ path: sibling('event') });

  step(`find the last events of user ${eventUser}: ${eventId} is among them, with its attempts`);
  await page.selectOption('#event-by', 'userId');
  await page.fill('#event-id', eventUser);
  await page.press('#event-id', 'Enter');
  const found = page.locator(`#event-path details[data-message-id="${eventId}"]`);
  await found.waitFor();
  const userAttempts = await found.locator(`li[data-route="${flaky}"] li[data-attempt]`).count();
  const userEvents = await page.locator('#event-path details[data-message-id]').count();

  step(`open ${delivered}'s page: its charts have data points`);
  await page.click(`button[data-open="${delivered}"]`);
  await page.locator('#destination-page').waitFor({ state: 'visible' });
  await page.waitForFunction(() =>
    Number(document.querySelector('#page-charts figure[data-chart="Deliveries per second"] svg')?.dataset.points ?? 0) > 0);
  const charts = await page.locator('#page-charts figure').evaluateAll((figures) =>
    figures.map((figure) => ({ title: figure.dataset.chart, points: Number(figure.querySelector('svg').dataset.points) })));
  const focusedTitle = await page.evaluate(() => document.activeElement?.id);
  const pageReplay = `#page-replays tr[data-replay="${replayId}"]`;
  await page.locator(`${pageReplay} progress`).waitFor();
  const replayPage = await page.evaluate((row) => {
    const bar = document.querySelector(`${row} progress`);
    return { value: bar.value, max: bar.max, state: document.querySelector(`${row} td[data-field="state"]`).textContent };
  }, pageReplay);
  await page.screenshot({ path: sibling('destination'), fullPage: true });

  step('back to the overview, by keyboard');
  await page.focus('#page-back');
  await page.keyboard.press('Enter');
  await page.locator('#overview').waitFor({ state: 'visible' });

  step('on a phone-width screen nothing overflows the page');
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => {
    const wide = [...document.querySelectorAll('body *')]
      .filter((node) => node.getBoundingClientRect().right > window.innerWidth + 1)
      // Inside a scrolling box (a wide table) is fine: it scrolls, the page does not.
      .filter((node) => {
        for (let up = node.parentElement; up; up = up.parentElement) {
          if (getComputedStyle(up).overflowX !== 'visible') return false;
        }
        return true;
      })
      .slice(0, 5)
      .map((node) => `${node.tagName.toLowerCase()}#${node.id}.${node.className?.baseVal ?? node.className}`);
    return { by: document.documentElement.scrollWidth - window.innerWidth, wide };
  });
  if (overflow.by > 1) throw new Error(`the page is ${overflow.by}px wider than a phone screen: ${overflow.wide.join(', ')}`);

  const leaked = requested.filter((url) => url.includes(token));
  if (leaked.length > 0) throw new Error(`the token appeared in a URL: ${leaked.join(', ')}`);
  if (consoleErrors.length > 0) throw new Error(`the page logged errors: ${consoleErrors.join(' | ')}`);
  const refusedSignIn = failedLoads.filter((load) => load.startsWith('401 '));
  if (failedLoads.length !== 1 || refusedSignIn.length !== 1) {
    throw new Error(`expected one failed load (the refused sign-in's 401), got: ${failedLoads.join(' | ') || 'none'}`);
  }
  if (resourceErrors.length !== 1) throw new Error(`expected one failed-resource console error, got: ${resourceErrors.join(' | ')}`);

  console.log(JSON.stringify({
    ok: true,
    refusal,
    delivered: deliveredCount,
    dead_before: deadBefore,
    replayed_id: replayedId,
    live_message_id: messageId,
    live_routes: liveRoutes,
    spark_points: sparkPoints,
    paused_message_id: pausedMessageId,
    event_state: routeState,
    attempts,
    user_events: userEvents,
    user_attempts: userAttempts,
    replay_overview: replayOverview,
    replay_page: replayPage,
    charts,
    focused_title: focusedTitle,
    failed_loads: failedLoads,
    screenshot,
  }));
} finally {
  await browser.close();
}
