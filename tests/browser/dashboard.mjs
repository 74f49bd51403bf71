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
//   SCREENSHOT              where to save the screenshot (PNG)
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
const screenshot = env('SCREENSHOT');
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

  step('wait for a second refresh, so throughput has a value, then take the screenshot');
  await page.waitForFunction(
    (name) => /\/s$/.test(document.querySelector(`tr[data-destination="${name}"] td[data-field="throughput"]`)?.textContent ?? ''),
    delivered,
  );
  await page.screenshot({ path: screenshot, fullPage: true });

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
    failed_loads: failedLoads,
    screenshot,
  }));
} finally {
  await browser.close();
}
