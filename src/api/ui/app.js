// keypooler admin page (SPEC §8.8). Plain script, no framework, no build step.
// Guarantees: every value from the API reaches the page through textContent or a property,
// never as markup; the admin token lives in sessionStorage only and travels as a Bearer
// header, never in a URL; rows are updated in place (keyed by id), so a refresh neither
// flickers nor invalidates what the operator is pointing at.
'use strict';

(function () {
  const TOKEN_KEY = 'keypooler.admin-token';
  const REFRESH_MS = 5000;
  const PAGE_SIZE = 50;
  const SERVES_SHOWN = 25;
  const STATES = ['active', 'cooling', 'probing', 'exhausted', 'quarantined', 'disabled',
    'spent', 'expired', 'unreadable'];

  const $ = (id) => document.getElementById(id);
  let token = null;
  let data = null;
  let timer = null;
  let refreshing = -1;
  let generation = 0;
  let note = { text: '', until: 0 };
  let clockOffset = 0;
  let lastUpdate = 0;
  let page = 0;
  let signInStarted = 0;

  class AuthError extends Error {}

  // --- small DOM helpers: text only ---------------------------------------------------
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function setText(node, text) {
    const value = text === undefined || text === null ? '' : String(text);
    if (node.textContent !== value) node.textContent = value;
  }
  function setChildren(parent, children) {
    const current = parent.children;
    let same = current.length === children.length;
    for (let i = 0; same && i < children.length; i++) same = current[i] === children[i];
    if (!same) parent.replaceChildren(...children);
  }
  function now() { return Date.now() + clockOffset; }

  function duration(ms) {
    let s = Math.max(0, Math.ceil(ms / 1000));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d > 0) return d + 'd ' + h + 'h';
    if (h > 0) return h + 'h ' + String(m).padStart(2, '0') + 'm';
    if (m > 0) return m + 'm ' + String(s).padStart(2, '0') + 's';
    return s + 's';
  }
  function clock(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return String(iso);
    return new Date(t).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  }
  function seconds(n) {
    if (n % 86400 === 0) return (n / 86400) + ' d';
    if (n % 3600 === 0) return (n / 3600) + ' h';
    if (n % 60 === 0) return (n / 60) + ' min';
    return n + ' s';
  }
  // A feature's limits: one window object, or (plan-shaped limits) an array of them.
  function windows(value) {
    if (Array.isArray(value)) return value.filter((w) => w && typeof w === 'object');
    return value && typeof value === 'object' ? [value] : [];
  }

  // --- the API --------------------------------------------------------------------------
  async function api(method, path, body) {
    const init = {
      method,
      headers: { Authorization: 'Bearer ' + token },
      cache: 'no-store',
      credentials: 'omit',
      referrerPolicy: 'no-referrer',
    };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const res = await fetch(path, init);
    const date = Date.parse(res.headers.get('date') || '');
    if (!Number.isNaN(date)) clockOffset = date + 500 - Date.now();
    const text = await res.text();
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
    if (res.status === 401) {
      throw new AuthError('The token was refused (401): ' + errorText(json, 'unknown token') +
        '. Enter the admin token.');
    }
    if (res.status === 403) {
      throw new AuthError('That token may not read the admin API (403): ' +
        errorText(json, 'forbidden') + '. The page needs the admin token.');
    }
    return { status: res.status, ok: res.ok, json };
  }
  function errorText(json, fallback) {
    return json && typeof json.error === 'string' ? json.error : fallback;
  }
  async function read(path) {
    const r = await api('GET', path);
    if (!r.ok) throw new Error('GET ' + path + ' answered ' + r.status + ': ' + errorText(r.json, ''));
    return r.json;
  }
  // Sources are optional: 404 means the server has no source endpoint or none configured.
  async function readSources() {
    const r = await api('GET', '/admin/sources');
    if (r.status === 404) return { list: [], note: 'No sources (none configured on this server).' };
    if (!r.ok) return { list: [], note: 'Sources could not be read (' + r.status + '): ' + errorText(r.json, '') };
    const list = r.json && Array.isArray(r.json.sources) ? r.json.sources : [];
    return { list, note: list.length ? '' : 'No sources configured.' };
  }

  // --- signing in and out ---------------------------------------------------------------
  function showLogin(message) {
    $('app').hidden = true;
    $('login').hidden = false;
    $('sign-out').hidden = true;
    setText($('login-error'), message || '');
    setText($('status'), '');
    $('token').focus();
  }
  function signOut(message) {
    generation++;
    token = null;
    data = null;
    note = { text: '', until: 0 };
    sessionStorage.removeItem(TOKEN_KEY);
    if (timer) clearTimeout(timer);
    timer = null;
    clearTables();
    showLogin(message);
    delete document.body.dataset.loaded;
  }
  function signIn(value) {
    token = value;
    signInStarted = performance.now();
    setText($('login-error'), '');
    setText($('status'), 'Loading…');
    refresh();
  }
  function clearTables() {
    for (const id of ['tiers', 'keys', 'consumers', 'serves', 'sources']) {
      $(id).tBodies[0].replaceChildren();
    }
    $('summary').replaceChildren();
    rowCache.keys.clear();
  }

  // --- refresh loop -----------------------------------------------------------------------
  async function refresh() {
    const mine = generation;
    if (refreshing === mine || !token) return;
    refreshing = mine;
    if (timer) clearTimeout(timer);
    timer = null;
    const started = performance.now();
    try {
      const [health, tiers, keys, consumers, serves, sources] = await Promise.all([
        read('/admin/health'),
        read('/admin/tiers'),
        read('/admin/keys'),
        read('/admin/consumers'),
        read('/admin/usage?limit=' + SERVES_SHOWN),
        readSources(),
      ]);
      if (mine !== generation) return;
      data = { health, tiers, keys, consumers, serves, sources };
      const first = !document.body.dataset.loaded;
      if (first) sessionStorage.setItem(TOKEN_KEY, token);
      $('login').hidden = true;
      $('app').hidden = false;
      $('sign-out').hidden = false;
      render();
      lastUpdate = Date.now();
      const took = Math.round(performance.now() - started);
      document.body.dataset.refreshMs = String(took);
      if (first) {
        document.body.dataset.firstLoadMs = String(Math.round(performance.now() - signInStarted));
        document.body.dataset.loaded = 'true';
      }
      tick();
    } catch (e) {
      if (mine !== generation) return;
      if (e instanceof AuthError) {
        signOut(e.message);
        return;
      }
      if (data) {
        say('Refresh failed (showing the last data): ' + e.message);
      } else {
        showLogin('Could not load: ' + e.message);
        token = null;
        return;
      }
    } finally {
      if (refreshing === mine) refreshing = -1;
      if (mine === generation && token) timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  // Every second: countdowns and the "updated" line, from data already held.
  function tick() {
    for (const node of document.querySelectorAll('[data-until]')) {
      const left = Number(node.dataset.until) - now();
      setText(node, left > 0 ? duration(left) + ' left' : 'due now');
    }
    if (data && lastUpdate) {
      const ago = Math.round((Date.now() - lastUpdate) / 1000);
      let text = 'Updated ' + ago + ' s ago · refreshes every ' + REFRESH_MS / 1000 + ' s';
      if (note.text && Date.now() < note.until) text = note.text + ' · ' + text;
      setText($('status'), text);
    }
  }
  // A message in the status line for a few seconds (the outcome of an action or a refresh).
  function say(text) {
    note = { text, until: Date.now() + 10000 };
    tick();
  }

  // --- derived key state ----------------------------------------------------------------
  function keyState(k) {
    if (k.readable === false) return 'unreadable';
    if (!k.is_active) return 'disabled';
    const health = k.health && typeof k.health.state === 'string' ? k.health.state : 'active';
    if (health !== 'active') return health;
    if (k.expires_at && Date.parse(k.expires_at) <= now()) return 'expired';
    if (k.usage_limit !== null && k.usage_limit !== undefined && k.usage_count >= k.usage_limit) {
      return 'spent';
    }
    return 'active';
  }
  function stateClass(state) {
    return 'state state-' + (STATES.includes(state) ? state : 'other');
  }

  // --- rendering ----------------------------------------------------------------------------
  function render() {
    const keys = Array.isArray(data.keys) ? data.keys : [];
    for (const k of keys) k._state = keyState(k);
    renderSummary(keys);
    renderTiers(keys);
    renderFilters(keys);
    renderKeys(keys);
    renderConsumers();
    renderServes(keys);
    renderSources();
  }

  function renderSummary(keys) {
    const counts = {};
    for (const s of STATES) counts[s] = 0;
    for (const k of keys) counts[k._state] = (counts[k._state] || 0) + 1;
    const items = [['Keys', keys.length]];
    for (const s of STATES) items.push([s, counts[s]]);
    items.push(['Tiers', (data.tiers || []).length]);
    items.push(['Consumers', (data.consumers || []).length]);
    const sources = data.sources.list;
    const stale = sources.filter((s) => s.status !== 'ok').length;
    items.push(['Sources', sources.length ? sources.length + (stale ? ' (' + stale + ' not ok)' : ' ok') : 'none']);
    if (data.health && Array.isArray(data.health.warnings) && data.health.warnings.length) {
      items.push(['Warnings', data.health.warnings.join(' · ')]);
    }
    const strip = $('summary');
    const nodes = items.map(([label, value], i) => {
      let li = strip.children[i];
      if (!li) {
        li = el('li');
        li.append(el('span', 'value'), el('span', 'label'));
      }
      li.className = STATES.includes(label) ? stateClass(label) + (value ? '' : ' zero') : '';
      setText(li.children[0], typeof value === 'number' ? value.toLocaleString('en') : value);
      setText(li.children[1], label);
      return li;
    });
    setChildren(strip, nodes);
  }

  function renderTiers(keys) {
    const tiers = Array.isArray(data.tiers) ? data.tiers : [];
    const byTier = new Map();
    for (const k of keys) {
      const name = k.tier === null || k.tier === undefined ? '' : k.tier;
      if (!byTier.has(name)) byTier.set(name, {});
      const c = byTier.get(name);
      c[k._state] = (c[k._state] || 0) + 1;
    }
    const rows = tiers.map((t) => {
      const tr = el('tr');
      tr.dataset.tier = t.name;
      const name = el('td');
      name.append(el('strong', null, t.name));
      if (t.description) name.append(el('div', 'muted', t.description));
      const features = el('td');
      for (const [f, value] of Object.entries(t.features || {})) {
        const limits = windows(value).map((w) => w.rate_limit + ' per ' + seconds(w.window_seconds));
        const line = el('div', 'feature');
        line.append(el('code', null, f), document.createTextNode(' ' + limits.join(' and ')));
        features.append(line);
      }
      const counts = byTier.get(t.name) || {};
      const total = Object.values(counts).reduce((a, b) => a + b, 0);
      const states = el('td');
      for (const s of STATES) {
        if (counts[s]) states.append(el('span', stateClass(s), s + ' ' + counts[s]), ' ');
      }
      tr.append(name, features, el('td', 'num', total), states);
      return tr;
    });
    $('tiers').tBodies[0].replaceChildren(...rows);
    $('tiers-empty').hidden = rows.length > 0;
  }

  function renderFilters(keys) {
    const tierSelect = $('filter-tier');
    const names = [...new Set((data.tiers || []).map((t) => t.name))].sort();
    const wanted = [''].concat(names);
    const have = [...tierSelect.options].map((o) => o.value);
    if (have.join('\u0000') !== wanted.join('\u0000')) {
      const chosen = tierSelect.value;
      tierSelect.replaceChildren(...wanted.map((n) => {
        const o = el('option', null, n === '' ? 'all' : n);
        o.value = n;
        return o;
      }));
      tierSelect.value = wanted.includes(chosen) ? chosen : '';
    }
    const stateSelect = $('filter-state');
    if (stateSelect.options.length === 1) {
      for (const s of STATES) {
        const o = el('option', null, s);
        o.value = s;
        stateSelect.append(o);
      }
    }
  }

  // Rows of the key table, kept by key id across refreshes.
  const rowCache = { keys: new Map() };

  function visibleKeys(keys) {
    const tier = $('filter-tier').value;
    const state = $('filter-state').value;
    const name = $('filter-name').value.trim().toLowerCase();
    return keys.filter((k) => (!tier || k.tier === tier) && (!state || k._state === state) &&
      (!name || String(k.name).toLowerCase().includes(name)));
  }

  function renderKeys(keys) {
    const shown = visibleKeys(keys);
    const pages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
    if (page >= pages) page = pages - 1;
    const slice = shown.slice(page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
    const from = shown.length ? page * PAGE_SIZE + 1 : 0;
    setText($('page-info'), from.toLocaleString('en') + '–' + (page * PAGE_SIZE + slice.length).toLocaleString('en') +
      ' of ' + shown.length.toLocaleString('en') + (shown.length !== keys.length ? ' (' + keys.length.toLocaleString('en') + ' in all)' : ''));
    $('page-prev').disabled = page === 0;
    $('page-next').disabled = page >= pages - 1;
    const live = new Set();
    const rows = slice.map((k) => {
      live.add(k.id);
      let row = rowCache.keys.get(k.id);
      if (!row) {
        row = keyRow(k.id);
        rowCache.keys.set(k.id, row);
      }
      updateKeyRow(row, k);
      return row.tr;
    });
    for (const id of [...rowCache.keys.keys()]) if (!live.has(id)) rowCache.keys.delete(id);
    setChildren($('keys').tBodies[0], rows);
    $('keys-empty').hidden = rows.length > 0;
  }

  function keyRow(id) {
    const tr = el('tr');
    tr.dataset.keyId = id;
    const cells = {
      name: el('td', 'name'),
      tier: el('td'),
      state: el('td'),
      budget: el('td', 'budget'),
      rates: el('td', 'rates'),
      last: el('td', 'num'),
      action: el('td'),
    };
    cells.badge = el('span');
    cells.reason = el('span', 'muted');
    cells.countdown = el('span', 'countdown');
    cells.until = el('div', 'muted small');
    cells.state.append(cells.badge, ' ', cells.reason, ' ', cells.countdown, cells.until);
    cells.meter = el('meter');
    cells.budgetText = el('div', 'small');
    cells.budget.append(cells.meter, cells.budgetText);
    cells.button = el('button', 'toggle');
    cells.button.type = 'button';
    cells.button.addEventListener('click', () => toggleKey(id));
    cells.action.append(cells.button);
    tr.append(cells.name, cells.tier, cells.state, cells.budget, cells.rates, cells.last, cells.action);
    return { tr, cells, rates: new Map() };
  }

  function updateKeyRow(row, k) {
    const c = row.cells;
    row.key = k;
    setText(c.name, k.name);
    setText(c.tier, k.tier === null || k.tier === undefined ? '(no tier)' : k.tier);
    const cls = stateClass(k._state);
    if (c.badge.className !== cls) c.badge.className = cls;
    setText(c.badge, k._state);
    const health = k.health || {};
    const reason = health.reason && health.reason !== k._state ? health.reason : '';
    setText(c.reason, k._state === 'unreadable' ? (k.error || '') : reason);
    const untilIso = k._state === 'expired' ? null : health.until;
    const until = untilIso ? Date.parse(untilIso) : NaN;
    if (!Number.isNaN(until) && k._state !== 'active' && k._state !== 'disabled') {
      if (c.countdown.dataset.until !== String(until)) {
        c.countdown.dataset.until = String(until);
        const left = until - now();
        setText(c.countdown, left > 0 ? duration(left) + ' left' : 'due now');
      }
      setText(c.until, 'until ' + clock(untilIso));
    } else {
      delete c.countdown.dataset.until;
      setText(c.countdown, '');
      setText(c.until, k._state === 'expired' && k.expires_at ? 'expired ' + clock(k.expires_at) : '');
    }
    // Budget: count against limit, with the window's reset.
    const limited = k.usage_limit !== null && k.usage_limit !== undefined;
    c.meter.hidden = !limited;
    if (limited) {
      c.meter.max = k.usage_limit;
      c.meter.high = k.usage_limit * 0.8;
      c.meter.low = k.usage_limit * 0.5;
      c.meter.optimum = 0;
      c.meter.value = Math.min(k.usage_count, k.usage_limit);
      let text = k.usage_count.toLocaleString('en') + ' / ' + k.usage_limit.toLocaleString('en');
      if (k.usage_window_seconds) {
        text += ' per ' + seconds(k.usage_window_seconds);
        const start = Date.parse(k.usage_window_start || '');
        if (!Number.isNaN(start)) {
          text += ' · resets ' + clock(new Date(start + k.usage_window_seconds * 1000).toISOString());
        }
      } else {
        text += ' lifetime';
      }
      setText(c.budgetText, text);
      c.meter.title = text;
    } else {
      setText(c.budgetText, k.usage_count.toLocaleString('en') + ' served · no cap');
    }
    // Rate windows per feature: one meter each (several for plan-shaped limits).
    const lines = [];
    for (const [f, value] of Object.entries(k.usage || {})) {
      windows(value).forEach((w, i) => {
        const id = f + '\u0000' + i;
        let line = row.rates.get(id);
        if (!line) {
          line = { div: el('div', 'rate'), label: el('code'), meter: el('meter'), text: el('span', 'small') };
          line.div.append(line.label, ' ', line.meter, ' ', line.text);
          row.rates.set(id, line);
        }
        setText(line.label, f);
        const limit = Number(w.limit) || 0;
        line.meter.max = Math.max(limit, 1);
        line.meter.high = limit * 0.8;
        line.meter.low = limit * 0.5;
        line.meter.optimum = 0;
        line.meter.value = Math.min(Number(w.used) || 0, limit);
        setText(line.text, (w.used || 0) + ' / ' + limit + ' per ' + seconds(w.window_seconds));
        lines.push(line.div);
      });
    }
    setChildren(c.rates, lines);
    setText(c.last, health.last_status === null || health.last_status === undefined ? '' : health.last_status);
    setText(c.button, k.is_active ? 'Disable' : 'Enable');
    c.button.dataset.action = k.is_active ? 'disable' : 'enable';
  }

  function renderConsumers() {
    const consumers = Array.isArray(data.consumers) ? data.consumers : [];
    const rows = consumers.map((c) => {
      const tr = el('tr');
      tr.dataset.consumerId = c.id;
      const scopes = el('td', 'scopes');
      for (const s of c.scopes || []) scopes.append(el('span', 'chip', s), ' ');
      if (!(c.scopes || []).length) scopes.append(el('span', 'muted', 'no tiers'));
      tr.append(el('td', 'name', c.name), el('td', null, c.is_active ? 'yes' : 'no'), scopes,
        el('td', 'muted', c.description || ''));
      return tr;
    });
    $('consumers').tBodies[0].replaceChildren(...rows);
    $('consumers-empty').hidden = rows.length > 0;
  }

  function renderServes(keys) {
    const names = new Map(keys.map((k) => [k.id, k.name]));
    const consumers = new Map((data.consumers || []).map((c) => [c.id, c.name]));
    const serves = Array.isArray(data.serves) ? data.serves : [];
    const rows = serves.map((s) => {
      const tr = el('tr');
      const outcome = s.outcome
        ? el('span', 'outcome outcome-' + (/^[a-z_]+$/.test(s.outcome.class) ? s.outcome.class : 'other'),
          s.outcome.class + (s.outcome.status ? ' (' + s.outcome.status + ')' : ''))
        : el('span', 'muted', 'unreported');
      const td = el('td');
      td.append(outcome);
      tr.append(el('td', 'small', clock(s.created_at)), el('td', 'name', names.get(s.key_id) || s.key_id),
        el('td', null, s.consumer_id === 'admin' ? 'admin' : consumers.get(s.consumer_id) || s.consumer_id),
        el('td', null, s.feature), td);
      return tr;
    });
    $('serves').tBodies[0].replaceChildren(...rows);
    $('serves-empty').hidden = rows.length > 0;
  }

  function renderSources() {
    const rows = data.sources.list.map((s) => {
      const tr = el('tr');
      tr.dataset.source = s.name;
      const status = el('td');
      status.append(el('span', 'source source-' + (['ok', 'stale', 'pending'].includes(s.status) ? s.status : 'other'), s.status));
      if (typeof s.age_seconds === 'number') status.append(' ', el('span', 'muted', 'data ' + duration(s.age_seconds * 1000) + ' old'));
      const tiers = el('td');
      for (const [t, n] of Object.entries(s.tiers || {})) tiers.append(el('span', 'chip', t + ' ' + n), ' ');
      const button = el('button', 'refresh-source', 'Refresh');
      button.type = 'button';
      button.addEventListener('click', () => refreshSource(s.name));
      const action = el('td');
      action.append(button);
      tr.append(el('td', 'name', s.name), status,
        el('td', 'small', s.last_success_at ? clock(s.last_success_at) : 'never'),
        el('td', 'error', s.last_error || ''), el('td', 'num', s.credentials), tiers, action);
      return tr;
    });
    $('sources').tBodies[0].replaceChildren(...rows);
    setText($('sources-empty'), data.sources.note);
    $('sources-empty').hidden = rows.length > 0;
  }

  // --- actions: each confirmed, each through the same endpoint curl would use -------------
  async function toggleKey(id) {
    const row = rowCache.keys.get(id);
    if (!row || !row.key) return;
    const k = row.key;
    const enable = !k.is_active;
    const question = enable
      ? 'Enable key "' + k.name + '"? /key serves it again and its automatic state is cleared.'
      : 'Disable key "' + k.name + '"? /key stops serving it until an operator enables it.';
    if (!window.confirm(question)) return;
    await act('PATCH', '/admin/keys/' + encodeURIComponent(id), { is_active: enable },
      (enable ? 'Enabled ' : 'Disabled ') + 'key "' + k.name + '".');
  }
  async function refreshSource(name) {
    if (!window.confirm('Refresh source "' + name + '" now?')) return;
    await act('POST', '/admin/sources/' + encodeURIComponent(name) + '/refresh', undefined,
      'Refreshed source "' + name + '".');
  }
  async function act(method, path, body, done) {
    try {
      const r = await api(method, path, body);
      if (!r.ok) {
        window.alert(method + ' ' + path + ' failed (' + r.status + '): ' + errorText(r.json, ''));
        return;
      }
      say(done);
    } catch (e) {
      if (e instanceof AuthError) { signOut(e.message); return; }
      window.alert(method + ' ' + path + ' failed: ' + e.message);
      return;
    }
    while (refreshing === generation) await new Promise((resolve) => setTimeout(resolve, 50));
    await refresh();
  }

  // --- wiring ---------------------------------------------------------------------------
  function rerenderKeys() {
    if (data) renderKeys(Array.isArray(data.keys) ? data.keys : []);
  }
  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const value = $('token').value.trim();
      $('token').value = '';
      if (!value) { setText($('login-error'), 'Enter the admin token.'); return; }
      signIn(value);
    });
    $('sign-out').addEventListener('click', () => signOut(''));
    $('filter-tier').addEventListener('change', () => { page = 0; rerenderKeys(); });
    $('filter-state').addEventListener('change', () => { page = 0; rerenderKeys(); });
    $('filter-name').addEventListener('input', () => { page = 0; rerenderKeys(); });
    $('page-prev').addEventListener('click', () => { page = Math.max(0, page - 1); rerenderKeys(); });
    $('page-next').addEventListener('click', () => { page++; rerenderKeys(); });
    setInterval(tick, 1000);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved); else showLogin('');
  });
})();
