// A website on its own origin that loads the real @segment/analytics-next (from npm, bundled
// with esbuild as a user would) pointed at Switchyard, in Debian's headless Chromium. Run by
// tests/website.rs, which checks what reached the webhook; this prints a JSON report last.
//
// Environment:
//   SWITCHYARD_URL   http://127.0.0.1:PORT (the analytics.js cdnURL)
//   WRITE_KEY        the source's write key
//   SITE_PORT        the port of the allowed origin (http://127.0.0.1:SITE_PORT)
//   OTHER_PORT       the port of an origin the source does not allow
//   RUN              a marker put in every event's properties/traits
//   CHROMIUM         the browser (default /usr/bin/chromium)
import http from 'node:http';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';
import { chromium } from 'playwright-core';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const switchyard = env('SWITCHYARD_URL');
const writeKey = env('WRITE_KEY');
const run = env('RUN');
const executablePath = env('CHROMIUM', '/usr/bin/chromium');
const TIMEOUT = 20_000;
const step = (text) => console.log(`step: ${text}`);

step('bundle the site with esbuild');
const bundled = await build({
  entryPoints: [fileURLToPath(new URL('./site/app.js', import.meta.url))],
  bundle: true,
  format: 'iife',
  platform: 'browser',
  target: 'es2020',
  write: false,
  logLevel: 'error',
});
const script = bundled.outputFiles[0].text;

const page = (loadOptions) => `<!doctype html><html><head><title>shop</title>
<script>window.siteOptions = ${JSON.stringify({ writeKey, cdnURL: switchyard, loadOptions })};</script>
<script src="/app.js"></script></head><body>shop</body></html>`;

const serve = (port) =>
  new Promise((resolve) => {
    const server = http.createServer((request, response) => {
      const url = new URL(request.url, 'http://site');
      if (url.pathname === '/app.js') {
        response.writeHead(200, { 'content-type': 'text/javascript' });
        response.end(script);
        return;
      }
      const batching = url.searchParams.get('strategy') === 'batching';
      const loadOptions = batching
        ? { integrations: { 'Segment.io': { deliveryStrategy: { strategy: 'batching', config: { size: 3, timeout: 500 } } } } }
        : {};
      response.writeHead(200, { 'content-type': 'text/html' });
      response.end(page(loadOptions));
    });
    server.listen(Number(port), '127.0.0.1', () => resolve(server));
  });

const site = await serve(env('SITE_PORT'));
const other = await serve(env('OTHER_PORT'));
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});

const report = { ok: false, requests: {}, outside: [], refused: null, errors: [] };
const count = (url) => {
  const path = new URL(url).pathname;
  report.requests[path] = (report.requests[path] ?? 0) + 1;
};

async function open(origin, strategy) {
  const context = await browser.newContext();
  const tab = await context.newPage();
  tab.setDefaultTimeout(TIMEOUT);
  // Only loopback: anything else is recorded and refused.
  await tab.route('**/*', (route) => {
    const host = new URL(route.request().url()).hostname;
    if (host === '127.0.0.1' || host === 'localhost') return route.continue();
    report.outside.push(route.request().url());
    return route.abort();
  });
  tab.on('request', (request) => {
    if (request.url().startsWith(switchyard) && request.method() !== 'OPTIONS') count(request.url());
  });
  tab.on('pageerror', (error) => report.errors.push(error.message));
  await tab.goto(`${origin}/?strategy=${strategy}`);
  return { context, tab };
}

try {
  const origin = `http://127.0.0.1:${env('SITE_PORT')}`;

  step('one request per call: identify, track, page, group, alias');
  const standard = await open(origin, 'standard');
  await standard.tab.evaluate(async (run) => {
    const [analytics] = await window.analytics;
    await analytics.identify('user-1', { email: 'ada@example.com', run });
    await analytics.track('Order Completed', { revenue: 42, run });
    await analytics.page('Shop', 'Checkout', { run });
    await analytics.group('org-1', { name: 'Acme', run });
    await analytics.alias('user-1-alias', 'user-1', { context: { run } });
  }, run);
  await standard.context.close();

  step('the batching strategy: six tracks in batches of three');
  const batching = await open(origin, 'batching');
  await batching.tab.evaluate(async (run) => {
    const [analytics] = await window.analytics;
    await Promise.all([1, 2, 3, 4, 5, 6].map((n) => analytics.track(`Batched ${n}`, { run })));
  }, run);
  // The SDK sends a full batch at once; give the requests time to finish.
  await batching.tab.waitForTimeout(1500);
  await batching.context.close();

  step('an origin the source does not allow gets nothing in');
  const refused = await open(`http://127.0.0.1:${env('OTHER_PORT')}`, 'standard');
  report.refused = await refused.tab.evaluate(async (run) => {
    try {
      const [analytics] = await Promise.race([
        window.analytics,
        new Promise((_, reject) => setTimeout(() => reject(new Error('load timed out')), 5000)),
      ]);
      await Promise.race([
        analytics.track('Not Allowed', { run }),
        new Promise((resolve) => setTimeout(resolve, 3000)),
      ]);
      return 'loaded';
    } catch (error) {
      return `failed: ${error.message}`;
    }
  }, run);
  await refused.context.close();
  report.ok = true;
} catch (error) {
  report.errors.push(String(error.stack ?? error));
} finally {
  await browser.close();
  site.close();
  other.close();
  console.log(JSON.stringify(report));
}
