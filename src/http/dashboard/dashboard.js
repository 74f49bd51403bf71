// Switchyard dashboard: plain JavaScript, no dependencies.
//
// The admin token is kept in sessionStorage (this tab only) and sent as
// `Authorization: Bearer` on every call; it never goes into a URL or a cookie. The live stream
// is read with fetch() rather than EventSource, because EventSource cannot send that header.
// Everything from the server is put into the page as text (textContent), never as markup.
'use strict';

(() => {
  const TOKEN_KEY = 'switchyard.adminToken';
  const REFRESH_MS = 2000;
  const LIVE_MAX = 200;
  const SPARK_SECONDS = 300;
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  const number = new Intl.NumberFormat();
  const rate = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

  /** Creates an element with attributes and children (strings become text nodes). */
  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  class Unauthorized extends Error {}

  const session = {
    get token() { return sessionStorage.getItem(TOKEN_KEY); },
    set token(value) {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    },
  };

  /** Calls the admin API; a 401 means the token is wrong (or the admin API is off). */
  async function api(path, options = {}) {
    const headers = { Authorization: `Bearer ${session.token}` };
    if (options.body !== undefined) headers['Content-Type'] = 'application/json';
    const response = await fetch(path, {
      method: options.method || 'GET',
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: 'no-store',
      credentials: 'omit',
      signal: options.signal,
    });
    if (response.status === 401) {
      throw new Unauthorized(await errorMessage(response, 'the admin token was refused'));
    }
    if (!response.ok) {
      throw new Error(await errorMessage(response, `${response.status} ${response.statusText}`));
    }
    return options.raw ? response : response.json();
  }

  async function errorMessage(response, fallback) {
    try {
      const body = await response.json();
      return body.message || fallback;
    } catch {
      return fallback;
    }
  }

  function setStatus(text, isError = false) {
    const status = $('status');
    status.textContent = text;
    status.classList.toggle('error', isError);
  }

  // ---- Sign in and out ---------------------------------------------------------------------

  function showLogin(message = '') {
    stopAll();
    session.token = null;
    $('app').hidden = true;
    $('logout').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message;
    setStatus('');
    $('token').focus();
  }

  async function signIn(token) {
    session.token = token;
    try {
      await api('/admin/v1/destinations');
    } catch (error) {
      showLogin(error instanceof Unauthorized ? error.message : `Cannot reach Switchyard: ${error.message}`);
      return;
    }
    $('login').hidden = true;
    $('app').hidden = false;
    $('logout').hidden = false;
    startAll();
  }

  function handleFailure(error) {
    if (error instanceof Unauthorized) {
      showLogin(error.message);
    } else if (error.name !== 'AbortError') {
      setStatus(`Connection problem: ${error.message} (retrying)`, true);
    }
  }

  // ---- Destinations ------------------------------------------------------------------------

  const previous = new Map(); // name -> {delivered, dead, at}
  let destinations = [];
  let series = { sources: [], destinations: [] }; // the last 5 minutes, per second
  let opened = null; // the destination whose page is open

  async function refreshDestinations() {
    const [list, recent, { replays }] = await Promise.all([
      api('/admin/v1/destinations'),
      api(`/admin/v1/stats/series?seconds=${SPARK_SECONDS}`),
      api('/admin/v1/replays'),
    ]);
    const now = performance.now();
    destinations = list;
    series = recent;
    const body = $('destinations').tBodies[0];
    const focused = document.activeElement?.dataset?.focusKey;
    body.replaceChildren(...list.flatMap((destination) => destinationRows(destination, now)));
    if (focused) document.querySelector(`[data-focus-key="${CSS.escape(focused)}"]`)?.focus();
    $('no-destinations').hidden = list.length > 0;
    renderSources(recent.sources);
    renderReplays(replays);
    updateDeadLetterChoices(list);
    setStatus(`Updated ${new Date().toLocaleTimeString()}`);
  }

  function seriesOf(name) {
    return series.destinations.find((d) => d.name === name);
  }

  function renderSources(sources) {
    const body = $('sources').tBodies[0];
    body.replaceChildren(...sources.map((source) => {
      const total = (values) => values.reduce((sum, n) => sum + n, 0);
      return el('tr', { 'data-source': source.name },
        el('td', { class: 'name', text: source.name }),
        el('td', { class: 'num', 'data-field': 'accepted' },
          sparkline(source.accepted, `${source.name} accepted per second`),
          number.format(total(source.accepted))),
        el('td', { class: 'num', 'data-field': 'rejected' },
          sparkline(source.rejected, `${source.name} rejected per second`, 'bad'),
          number.format(total(source.rejected))));
    }));
  }

  // ---- Replays ------------------------------------------------------------------------------

  /** A replay's progress: delivered + failed of its events (the events selected). */
  function replayProgress(replay) {
    const events = replay.events ?? 0;
    const settled = (replay.delivered ?? 0) + (replay.failed ?? 0);
    const finished = replay.state === 'done' && events === 0;
    const max = Math.max(events, 1);
    return el('progress', {
      max,
      value: finished ? max : Math.min(settled, max),
      'aria-label': `${number.format(settled)} of ${number.format(events)} events`,
      title: `${number.format(settled)} of ${number.format(events)} events`,
    });
  }

  function replayWhen(text) {
    return text ? new Date(text).toLocaleString() : '–';
  }

  function renderReplays(replays) {
    $('replays').tBodies[0].replaceChildren(...replays.map((replay) => el('tr', { 'data-replay': replay.id },
      el('td', { class: 'num', text: replay.id }),
      el('td', { 'data-field': 'destination' },
        el('button', {
          type: 'button',
          class: 'link name',
          onclick: () => openPage(replay.destination),
          text: replay.destination,
        })),
      el('td', { 'data-field': 'state', text: replay.state }),
      el('td', { 'data-field': 'progress' }, replayProgress(replay),
        el('span', { class: 'hint', text: ` ${number.format((replay.delivered ?? 0) + (replay.failed ?? 0))} / ${number.format(replay.events ?? 0)}` })),
      el('td', { text: replayWhen(replay.from) }),
      el('td', { text: replayWhen(replay.to) }),
      el('td', { class: 'num', 'data-field': 'failed', text: number.format(replay.failed ?? 0) }))));
    $('no-replays').hidden = replays.length > 0;
  }

  /** Pauses or resumes a destination, then shows the new state. */
  async function setPaused(name, paused, button) {
    button.disabled = true;
    try {
      await api(`/admin/v1/destinations/${encodeURIComponent(name)}/${paused ? 'pause' : 'resume'}`, { method: 'POST' });
      await refreshDestinations();
      if (opened === name) await refreshPage();
    } catch (error) {
      handleFailure(error);
    } finally {
      button.disabled = false;
    }
  }

  function pauseButton(d, focusKey) {
    return el('button', {
      type: 'button',
      class: `pause ${d.paused ? 'paused' : ''}`,
      'data-pause': d.name,
      'data-focus-key': focusKey,
      'aria-pressed': d.paused ? 'true' : 'false',
      'aria-label': `${d.paused ? 'Resume' : 'Pause'} deliveries to ${d.name}`,
      onclick: (e) => setPaused(d.name, !d.paused, e.currentTarget),
      text: d.paused ? 'Resume' : 'Pause',
    });
  }

  function destinationRows(d, now) {
    const before = previous.get(d.name);
    let throughput = null;
    if (before && now > before.at) {
      throughput = Math.max(0, d.delivered - before.delivered) / ((now - before.at) / 1000);
    }
    const newDead = before ? d.dead > before.dead : false;
    previous.set(d.name, { delivered: d.delivered, dead: d.dead, at: now });
    const samples = seriesOf(d.name)?.delivered ?? [];

    let health = 'ok';
    let healthText = 'healthy';
    if (d.retrying > 0 || d.last_error) {
      health = 'warn';
      healthText = 'retrying or recently failed';
    }
    if (newDead || (d.retrying > 0 && throughput === 0)) {
      health = 'bad';
      healthText = 'failing';
    }

    const count = (field, alert = false) => {
      const value = d[field] ?? 0;
      return el('td', {
        class: `num ${value === 0 ? 'zero' : alert ? 'alert' : ''}`,
        'data-field': field,
        text: number.format(value),
      });
    };
    const rateLimit = d.rate_limit
      ? `${d.rate_limit}${d.rate_factor !== undefined && d.rate_factor < 1 ? ` (×${rate.format(d.rate_factor)})` : ''}`
      : 'none';

    const row = el('tr', { 'data-destination': d.name },
      el('td', {},
        el('span', { class: `dot ${health}`, title: healthText, role: 'img', 'aria-label': healthText }),
        el('button', {
          type: 'button',
          class: 'link name',
          'data-open': d.name,
          'data-focus-key': `open:${d.name}`,
          onclick: () => openPage(d.name),
          text: d.name,
        }),
        el('span', { class: 'kind', text: d.kind }),
        d.paused ? el('span', { class: 'tag paused', text: 'paused' }) : null),
      el('td', { class: 'num', 'data-field': 'throughput' },
        sparkline(samples, `${d.name} deliveries per second, last 5 minutes`),
        throughput === null ? '–' : `${rate.format(throughput)}/s`),
      count('delivered'),
      count('queued'),
      count('in_flight'),
      count('retrying', true),
      count('dead', true),
      el('td', { 'data-field': 'rate_limit', text: rateLimit }),
      el('td', { class: 'num', 'data-field': 'concurrency_limit', text: d.concurrency_limit ?? '–' }),
      el('td', { class: 'error-text', 'data-field': 'last_error', text: d.last_error || '' }),
      el('td', {}, pauseButton(d, `pause:${d.name}`)));
    const rows = [row];
    if (Array.isArray(d.endpoints) && d.endpoints.length > 0) {
      rows.push(el('tr', { class: 'endpoints', 'data-endpoints-of': d.name },
        el('td', { colspan: 11 },
          el('ul', { class: 'chips', 'aria-label': `${d.name} endpoints` },
            d.endpoints.map(endpointChip)))));
    }
    if (Array.isArray(d.filters) && d.filters.length > 0) {
      rows.push(el('tr', { class: 'endpoints', 'data-filters-of': d.name },
        el('td', { colspan: 11 },
          el('ul', { class: 'chips', 'aria-label': `${d.name} filters` },
            d.filters.map((filter) => el('li', { text: String(filter) }))))));
    }
    return rows;
  }

  /** Endpoint health, whatever fields the server reports: the URL first, then the rest. */
  function endpointChip(endpoint) {
    if (typeof endpoint !== 'object' || endpoint === null) return el('li', { text: String(endpoint) });
    const label = endpoint.url || endpoint.name || 'endpoint';
    const healthy = endpoint.healthy ?? (endpoint.state ? endpoint.state === 'healthy' : undefined);
    const details = Object.entries(endpoint)
      .filter(([key]) => !['url', 'name'].includes(key))
      .map(([key, value]) => `${key.replaceAll('_', ' ')} ${typeof value === 'object' ? JSON.stringify(value) : value}`)
      .join(' · ');
    return el('li', {},
      el('span', { class: `dot ${healthy === false ? 'bad' : 'ok'}` }),
      el('span', { class: 'mono', text: label }),
      details ? ` — ${details}` : '');
  }

  function svgEl(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    return node;
  }

  /** Points of one polyline through `values` (which have no gaps) scaled to `top`. */
  function points(values, width, height, top) {
    return segments(values, width, height, top).flat();
  }

  /** Polylines through `values` scaled to `top`, broken where a value is null (no sample); a
   *  lone value becomes a short level line, so it shows. */
  function segments(values, width, height, top) {
    const step = values.length > 1 ? width / (values.length - 1) : width;
    const y = (value) => (height - 1 - (value / top) * (height - 2)).toFixed(1);
    const runs = [];
    let run = [];
    values.forEach((value, i) => {
      if (value === null || value === undefined) {
        if (run.length) runs.push(run);
        run = [];
      } else {
        run.push([i, value]);
      }
    });
    if (run.length) runs.push(run);
    return runs.map((r) => (r.length === 1
      ? [`${Math.max(0, (r[0][0] - 0.5) * step).toFixed(1)},${y(r[0][1])}`,
        `${Math.min(width, (r[0][0] + 0.5) * step).toFixed(1)},${y(r[0][1])}`]
      : r.map(([i, value]) => `${(i * step).toFixed(1)},${y(value)}`)));
  }

  /** A small line of per-second values; `data-points` counts the non-zero ones. */
  function sparkline(values, label, tone = '') {
    const width = 60;
    const height = 16;
    const nonZero = values.filter((v) => v > 0).length;
    const svg = svgEl('svg', {
      class: `spark ${tone}`,
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: 'img',
      'aria-label': `${label}: peak ${Math.max(0, ...values)}`,
      'data-points': nonZero,
    });
    if (values.length > 1) {
      const top = Math.max(...values, 1);
      svg.append(svgEl('polyline', { points: points(values, width, height, top).join(' ') }));
    }
    return svg;
  }

  /** A chart of one or more lines over the same seconds, with its peak and a legend. */
  function chart(title, lines, unit) {
    const width = 600;
    const height = 120;
    const all = lines.flatMap((line) => line.values.filter((v) => v !== null && v !== undefined));
    const top = Math.max(1, ...all);
    const nonZero = all.filter((v) => v > 0).length;
    const svg = svgEl('svg', {
      class: 'chart',
      viewBox: `0 0 ${width} ${height}`,
      preserveAspectRatio: 'none',
      role: 'img',
      'aria-label': `${title}: peak ${rate.format(top)} ${unit}`,
      'data-points': nonZero,
    });
    for (const fraction of [0.5, 1]) {
      const y = (height - 1 - fraction * (height - 2)).toFixed(1);
      svg.append(svgEl('line', { class: 'grid', x1: 0, x2: width, y1: y, y2: y }));
    }
    lines.forEach((line, i) => {
      for (const run of segments(line.values, width, height, top)) {
        svg.append(svgEl('polyline', { class: `series s${i}`, points: run.join(' ') }));
      }
    });
    return el('figure', { class: 'chart-box', 'data-chart': title },
      el('figcaption', {},
        el('strong', { text: title }),
        el('span', { class: 'hint', text: ` peak ${rate.format(top)} ${unit}` }),
        el('span', { class: 'legend' },
          lines.map((line, i) => el('span', { class: `key s${i}`, text: line.label })))),
      svg);
  }

  /** Per-second values folded into `step`-second points: the mean of counts, or the max of
   *  a gauge (null where nothing was sampled). */
  function fold(values, step, how) {
    const out = [];
    for (let i = 0; i < values.length; i += step) {
      const chunk = values.slice(i, i + step).filter((v) => v !== null && v !== undefined);
      if (chunk.length === 0) out.push(how === 'max' ? null : 0);
      else if (how === 'max') out.push(Math.max(...chunk));
      else out.push(chunk.reduce((sum, n) => sum + n, 0) / step);
    }
    return out;
  }

  /** The page's window: seconds shown and seconds per point. */
  function pageWindow() {
    const seconds = Number($('page-window').value) || 300;
    return { seconds, step: seconds > 600 ? 30 : 5 };
  }

  // ---- A destination's page ----------------------------------------------------------------

  function openPage(name) {
    opened = name;
    $('overview').hidden = true;
    $('destination-page').hidden = false;
    $('page-title').textContent = name;
    $('page-charts').replaceChildren();
    refreshPage().catch(handleFailure);
    $('page-title').focus();
  }

  function closePage() {
    const name = opened;
    opened = null;
    $('destination-page').hidden = true;
    $('overview').hidden = false;
    document.querySelector(`[data-open="${CSS.escape(name || '')}"]`)?.focus();
  }

  async function refreshPage() {
    if (!opened) return;
    const name = opened;
    const [list, hour, { replays }] = await Promise.all([
      api('/admin/v1/destinations'),
      api(`/admin/v1/stats/series?seconds=${pageWindow().seconds}`),
      api('/admin/v1/replays'),
    ]);
    if (opened !== name) return;
    const d = list.find((item) => item.name === name);
    if (!d) {
      $('page-config').replaceChildren(el('dd', { text: 'This destination is no longer configured.' }));
      return;
    }
    $('page-state').textContent = d.paused ? 'paused' : 'delivering';
    $('page-state').className = `tag ${d.paused ? 'paused' : ''}`;
    const button = $('page-pause');
    button.textContent = d.paused ? 'Resume' : 'Pause';
    button.setAttribute('aria-pressed', d.paused ? 'true' : 'false');
    button.setAttribute('aria-label', `${d.paused ? 'Resume' : 'Pause'} deliveries to ${name}`);
    button.onclick = () => setPaused(name, !d.paused, button);
    const facts = [
      ['Kind', d.kind],
      ['Queued', number.format(d.queued)],
      ['In flight', number.format(d.in_flight)],
      ['Retrying', number.format(d.retrying)],
      ['Dead letters', number.format(d.dead)],
      ['Delivered (this process)', number.format(d.delivered)],
      ['Rate limit', d.rate_limit || 'none'],
      ['Rate factor (AIMD)', d.rate_factor === undefined ? '–' : rate.format(d.rate_factor)],
      ['Concurrency', d.concurrency_limit ?? '–'],
    ];
    if (Array.isArray(d.filters) && d.filters.length > 0) facts.push(['Filters', d.filters.join(' · ')]);
    if (Array.isArray(d.endpoints) && d.endpoints.length > 0) {
      facts.push(['Endpoints', el('ul', { class: 'chips' }, d.endpoints.map(endpointChip))]);
    }
    $('page-config').replaceChildren(...facts.flatMap(([term, value]) =>
      [el('dt', { text: term }), el('dd', {}, value)]));
    $('page-error').textContent = d.last_error || 'none';
    const own = replays.filter((replay) => replay.destination === name);
    $('page-replays').tBodies[0].replaceChildren(...own.map((replay) => el('tr', { 'data-replay': replay.id },
      el('td', { class: 'num', text: replay.id }),
      el('td', { 'data-field': 'state', text: replay.state }),
      el('td', { 'data-field': 'progress' }, replayProgress(replay)),
      el('td', { text: replayWhen(replay.from) }),
      el('td', { text: replayWhen(replay.to) }),
      el('td', { class: 'num', text: number.format(replay.delivered ?? 0) }),
      el('td', { class: 'num', text: number.format(replay.failed ?? 0) }))));
    $('page-no-replays').hidden = own.length > 0;
    const s = hour.destinations.find((item) => item.name === name);
    if (!s) return;
    const PAGE_STEP = pageWindow().step;
    $('page-step').textContent = `Each point is ${PAGE_STEP} s.`;
    $('page-charts').replaceChildren(
      chart('Deliveries per second', [
        { label: 'delivered', values: fold(s.delivered, PAGE_STEP) },
        { label: 'retried', values: fold(s.retried, PAGE_STEP) },
        { label: 'dead', values: fold(s.dead, PAGE_STEP) },
      ], '/s'),
      chart('Queue depth', [{ label: 'queued', values: fold(s.queue_depth, PAGE_STEP, 'max') }], 'events'),
      chart('Latency, ingest to delivered', [
        { label: 'p50', values: fold(s.p50_ms, PAGE_STEP, 'max') },
        { label: 'p99', values: fold(s.p99_ms, PAGE_STEP, 'max') },
      ], 'ms'));
  }

  // ---- Where did this event go? ------------------------------------------------------------

  /** Looks an event up by messageId, or a user's last events by userId. */
  async function findEvent(by, value) {
    const out = $('event-path');
    out.replaceChildren(el('p', { class: 'hint', text: 'Looking…' }));
    let found;
    try {
      found = by === 'userId'
        ? await api(`/admin/v1/events?${new URLSearchParams({ userId: value })}`)
        : await api(`/admin/v1/events/${encodeURIComponent(value)}`);
    } catch (error) {
      if (error instanceof Unauthorized) {
        handleFailure(error);
        return;
      }
      out.replaceChildren(el('p', { class: 'empty', role: 'alert', text: error.message }));
      return;
    }
    if (by !== 'userId') {
      out.replaceChildren(eventPath(found));
      return;
    }
    if (found.items.length === 0) {
      out.replaceChildren(el('p', { class: 'empty', role: 'alert', text: `No recent events of ${value} in this process.` }));
      return;
    }
    out.replaceChildren(
      el('p', { class: 'hint', text: `The last ${found.items.length} events of ${value}, newest first, as seen by this process.` }),
      ...found.items.map((path) => el('details', { class: 'found', 'data-message-id': path.message_id, open: found.items.length === 1 },
        el('summary', {},
          el('span', { class: 'mono', text: path.message_id }),
          el('span', { class: 'hint', text: ` · ${new Date(path.received_at).toLocaleString()} · ${routeSummary(path.routes)}` })),
        eventPath(path))));
  }

  function routeSummary(routes) {
    const count = (state) => routes.filter((route) => route.state === state).length;
    return ['delivered', 'retrying', 'queued', 'dead', 'filtered']
      .filter((state) => count(state) > 0)
      .map((state) => `${count(state)} ${state}`)
      .join(', ') || 'no destination';
  }

  /** One event's path: when it was accepted, then each destination with its attempts. */
  function eventPath(path) {
    return el('div', { class: 'path', 'data-message-id': path.message_id },
      el('p', {},
        'Accepted ', el('strong', { text: new Date(path.received_at).toLocaleString() }),
        ' from ', el('strong', { text: path.source ?? 'an unknown source' }),
        el('span', { class: 'hint', text: ' · as seen by this process' })),
      el('ol', { class: 'routes' }, path.routes.map((route) =>
        el('li', { 'data-route': route.destination ?? '', 'data-state': route.state },
          el('span', { class: `dot ${route.state === 'delivered' ? 'ok' : route.state === 'dead' ? 'bad' : 'warn'}` }),
          el('strong', { text: route.destination ?? 'a removed destination' }),
          ` — ${route.state}${route.reason ? ` (${route.reason})` : ''}`,
          route.attempts.length === 0 ? null : el('ol', { class: 'attempts' }, route.attempts.map((attempt, i) =>
            el('li', { 'data-attempt': i + 1, class: attempt.error ? 'failed' : 'ok' },
              el('span', { class: 'when', text: new Date(attempt.at).toLocaleTimeString() }),
              attempt.status ? el('span', { class: 'tag', text: String(attempt.status) }) : null,
              attempt.error ? el('span', { class: 'error-text', text: attempt.error }) : 'delivered')))))));
  }

  // ---- Dead letters ------------------------------------------------------------------------

  let deadSignature = '';
  let confirmTimer = null;

  /** Keeps the choice; picks the first destination with dead letters when none was made. */
  function updateDeadLetterChoices(list) {
    const select = $('dead-destination');
    const chosen = select.value;
    const options = list.map((d) =>
      el('option', { value: d.name, text: `${d.name} (${number.format(d.dead)})` }));
    select.replaceChildren(...options);
    const keep = list.find((d) => d.name === chosen);
    const withDead = list.find((d) => d.dead > 0);
    select.value = keep ? chosen : withDead ? withDead.name : list[0]?.name ?? '';
  }

  async function refreshDeadLetters() {
    const destination = $('dead-destination').value;
    if (!destination) {
      renderDeadLetters([]);
      return;
    }
    const query = new URLSearchParams({ destination, limit: '50' });
    const { items } = await api(`/admin/v1/dead-letters?${query}`);
    const signature = destination + ':' + items.map((item) => item.id).join(',');
    if (signature !== deadSignature) {
      deadSignature = signature;
      renderDeadLetters(items);
    }
  }

  function renderDeadLetters(items) {
    const body = $('dead-letters').tBodies[0];
    body.replaceChildren(...items.map((item) => el('tr', { 'data-id': item.id },
      el('td', { class: 'num', text: item.id }),
      el('td', { class: 'mono', text: item.message_id }),
      el('td', { class: 'num', text: item.attempts }),
      el('td', { class: 'num', text: item.last_status ?? '—' }),
      el('td', { class: 'error-text', text: item.last_error }),
      el('td', { text: new Date(item.failed_at).toLocaleString() }),
      el('td', {}, eventDetails(item.event)),
      el('td', {}, el('button', {
        type: 'button',
        class: 'replay',
        'data-id': item.id,
        onclick: (e) => replay([item.id], e.currentTarget),
        text: 'Replay',
      })))));
    $('no-dead-letters').hidden = items.length > 0;
    $('replay-all').disabled = items.length === 0;
  }

  function eventSummary(event) {
    if (!event || typeof event !== 'object') return 'event';
    const what = event.type === 'track' ? event.event : event.name || event.groupId || event.previousId;
    return [event.type, what].filter(Boolean).join(' · ') || 'event';
  }

  function eventDetails(event) {
    return el('details', {},
      el('summary', { text: eventSummary(event) }),
      el('pre', { text: JSON.stringify(event, null, 2) }));
  }

  async function replay(ids, button) {
    const destination = $('dead-destination').value;
    if (button) button.disabled = true;
    try {
      const body = ids ? { destination, ids } : { destination };
      const { requeued } = await api('/admin/v1/dead-letters/replay', { method: 'POST', body });
      const result = $('replay-result');
      result.textContent = `Requeued ${number.format(requeued)} dead letter${requeued === 1 ? '' : 's'} for ${destination}.`;
      result.hidden = false;
      deadSignature = '';
      await refreshDeadLetters();
      await refreshDestinations();
    } catch (error) {
      if (button) button.disabled = false;
      handleFailure(error);
    }
  }

  /** "Replay all" asks once more before it acts (no blocking dialog). */
  function replayAll() {
    const button = $('replay-all');
    if (!button.classList.contains('confirm')) {
      button.classList.add('confirm');
      button.textContent = 'Click again to replay all';
      confirmTimer = setTimeout(resetReplayAll, 4000);
      return;
    }
    resetReplayAll();
    replay(null, null);
  }

  function resetReplayAll() {
    clearTimeout(confirmTimer);
    const button = $('replay-all');
    button.classList.remove('confirm');
    button.textContent = 'Replay all';
  }

  // ---- Live events -------------------------------------------------------------------------

  let live = null; // {controller}
  let livePaused = false;
  let liveRetry = null;

  function startLive() {
    stopLive();
    if (livePaused || !session.token) return;
    const controller = new AbortController();
    live = { controller };
    const source = $('live-source').value.trim();
    const query = source ? `?${new URLSearchParams({ source })}` : '';
    $('live-state').textContent = 'connecting…';
    readStream(`/admin/v1/live${query}`, controller.signal)
      .then(() => scheduleLiveRetry('stream ended'))
      .catch((error) => {
        if (error.name === 'AbortError') return;
        if (error instanceof Unauthorized) {
          handleFailure(error);
          return;
        }
        scheduleLiveRetry(error.message);
      });
  }

  function scheduleLiveRetry(reason) {
    $('live-state').textContent = `disconnected (${reason}); reconnecting…`;
    clearTimeout(liveRetry);
    liveRetry = setTimeout(startLive, 3000);
  }

  function stopLive() {
    clearTimeout(liveRetry);
    if (live) live.controller.abort();
    live = null;
  }

  /** Reads a server-sent event stream from a fetch() body: frames end with a blank line. */
  async function readStream(path, signal) {
    const response = await api(path, { raw: true, signal });
    $('live-state').textContent = 'connected';
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        handleFrame(frame);
      }
    }
  }

  function handleFrame(frame) {
    let type = 'message';
    const data = [];
    for (const line of frame.split('\n')) {
      if (line === '' || line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
      if (field === 'event') type = value;
      else if (field === 'data') data.push(value);
    }
    if (data.length === 0) return;
    let payload;
    try {
      payload = JSON.parse(data.join('\n'));
    } catch {
      return;
    }
    if (type === 'message') addLiveEvent(payload);
    else if (type === 'outcome') addLiveOutcome(payload);
    else if (type === 'lagged') addLiveNote(`Skipped ${number.format(payload.skipped)} events: they arrived faster than this page could show them.`);
  }

  /** A route chip: where the message was queued, or which rule filtered it from where. */
  function routeChip({ destination, state, reason, error }) {
    const why = reason ? ` (${reason})` : '';
    return el('li', { class: `route ${state}`, 'data-route': destination ?? '', 'data-state': state, 'data-reason': reason ?? '' },
      el('span', { class: 'name', text: destination ?? 'a removed destination' }),
      ` ${state}${why}`,
      error ? el('span', { class: 'error-text', text: ` — ${error}` }) : null);
  }

  function addLiveEvent({ source, received_at: receivedAt, message, routes }) {
    const who = message.userId ?? message.anonymousId ?? '';
    const what = message.type === 'track' ? message.event : message.name || message.groupId || message.previousId || '';
    const item = el('li', { 'data-message-id': message.messageId },
      el('details', {},
        el('summary', {},
          el('span', { class: 'when', text: new Date(receivedAt).toLocaleTimeString() }),
          el('span', { class: 'tag', text: source }),
          el('span', { class: 'tag', text: message.type }),
          el('strong', { text: what }),
          who ? ` · ${who}` : '',
          el('span', { class: 'hint mono', text: `  ${message.messageId ?? ''}` })),
        el('pre', { text: JSON.stringify(message, null, 2) })),
      el('ul', { class: 'chips routes-live', 'aria-label': 'routing' },
        (Array.isArray(routes) ? routes : []).map(routeChip)));
    prependLive(item);
  }

  /** What delivery made of a message (a transform's null or failure, a retry, a dead letter):
   *  under the message when it is still listed, else on its own line. */
  function addLiveOutcome(outcome) {
    const chip = routeChip(outcome);
    chip.classList.add('outcome');
    const item = [...$('live-events').children].find((li) => li.dataset.messageId === outcome.message_id);
    if (item) {
      item.querySelector('.routes-live')?.append(chip);
      return;
    }
    prependLive(el('li', { class: 'outcome-line', 'data-outcome-of': outcome.message_id },
      el('span', { class: 'hint mono', text: `${outcome.message_id} ` }),
      el('ul', { class: 'chips routes-live' }, chip)));
  }

  function addLiveNote(text) {
    prependLive(el('li', { class: 'lagged', text }));
  }

  function prependLive(item) {
    const list = $('live-events');
    list.prepend(item);
    while (list.children.length > LIVE_MAX) list.lastElementChild.remove();
    $('no-live').hidden = true;
  }

  function toggleLive() {
    livePaused = !livePaused;
    $('live-toggle').textContent = livePaused ? 'Resume' : 'Pause';
    if (livePaused) {
      stopLive();
      $('live-state').textContent = 'paused';
    } else {
      startLive();
    }
  }

  // ---- The refresh loop --------------------------------------------------------------------

  let timer = null;

  async function refresh() {
    try {
      await refreshDestinations();
      await refreshDeadLetters();
      await refreshPage();
    } catch (error) {
      handleFailure(error);
      if (error instanceof Unauthorized) return;
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  function startAll() {
    stopAll();
    refresh();
    startLive();
  }

  function stopAll() {
    clearTimeout(timer);
    timer = null;
    stopLive();
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const token = $('token').value.trim();
      $('token').value = '';
      if (token) signIn(token);
    });
    $('logout').addEventListener('click', () => showLogin('Signed out.'));
    $('dead-destination').addEventListener('change', () => {
      deadSignature = '';
      $('replay-result').hidden = true;
      refreshDeadLetters().catch(handleFailure);
    });
    $('replay-all').addEventListener('click', replayAll);
    $('page-back').addEventListener('click', closePage);
    $('page-window').addEventListener('change', () => refreshPage().catch(handleFailure));
    $('event-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const value = $('event-id').value.trim();
      if (value) findEvent($('event-by').value, value);
    });
    $('event-by').addEventListener('change', () => {
      $('event-id').placeholder = $('event-by').value;
    });
    $('live-toggle').addEventListener('click', toggleLive);
    $('live-source').addEventListener('change', () => {
      $('live-events').replaceChildren();
      $('no-live').hidden = false;
      startLive();
    });
    if (session.token) signIn(session.token);
    else showLogin();
  });
})();
