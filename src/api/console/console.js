// creditd console: the Workspaces tab and the ledger of one org, over the control-plane API.
//
// Plain JavaScript, no framework, no build step: creditd embeds this file and serves it under
// /console/ with a Content-Security-Policy that allows scripts and styles from 'self' only, so
// nothing here may use inline handlers, inline styles or eval. All text reaches the page through
// textContent, never parsed as markup. The admin token is typed by the operator and kept in this tab's
// sessionStorage; it is sent only in the Authorization header of calls to this same origin.
'use strict';

(function () {
  const TOKEN_KEY = 'creditd.console.token';
  // The API has no list of orgs: the picker lists the orgs opened or created in this browser.
  const ORGS_KEY = 'creditd.console.orgs';
  const ORGS_MAX = 50;
  const REFRESH_INTERVAL_MS = 2000;
  const REQUEST_TIMEOUT_MS = 15000;
  const PREVIEW_DELAY_MS = 200;
  const AMOUNT_MAX = 1e15;
  const MODE_NAMES = { shared: 'Shared Pool', budget: 'Workspace Budget' };

  const $ = (id) => document.getElementById(id);

  const state = {
    org: null, // the org open in the Workspaces tab
    view: null, // its last org view from the API
    rows: new Map(), // workspace name -> its table row
    refreshTimer: null,
    refreshing: false,
    modeChangePending: false,
    ledger: { after: 0, previous: [], next: null },
    ledgerSeq: 0,
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status; // 0 when creditd did not answer: the outcome is unknown
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: 'Bearer ' + (sessionStorage.getItem(TOKEN_KEY) || '') };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, {
        method, headers, cache: 'no-store', credentials: 'omit', signal: abort.signal,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, 'network', 'creditd did not answer (' + e.message + ')');
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    if (!response.ok) {
      const code = (data && data.error) || 'http_' + response.status;
      const error = new ApiError(response.status, code, (data && data.message) || 'HTTP ' + response.status);
      if (response.status === 401) signOut('The admin token was refused: ' + error.message);
      throw error;
    }
    return data;
  }

  const orgPath = (suffix) => '/v1/orgs/' + encodeURIComponent(state.org) + (suffix || '');

  // An idempotency key from the browser's random source (crypto.randomUUID needs a secure
  // context, which a console reached over plain http on a LAN address is not).
  function newKey() {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return 'console-' + Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
  }

  // The API's amounts are JSON integers from 1 to 10^15.
  function parseAmount(text) {
    const t = String(text).trim();
    if (!/^[0-9]+$/.test(t) || Number(t) < 1 || Number(t) > AMOUNT_MAX) {
      throw new ApiError(-1, 'invalid_amount', 'Amount must be a whole number from 1 to 1000000000000000.');
    }
    return Number(t);
  }

  // ---------------------------------------------------------------- messages

  function announce(text) { $('status').textContent = text; }
  function showError(id, error) { $(id).textContent = error ? error.message || String(error) : ''; }

  // ---------------------------------------------------------------- sign-in

  function signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopRefresh();
    closeMenu(false);
    for (const d of [$('manage'), $('confirm')]) if (d.open) d.close();
    $('app-view').hidden = true;
    $('signout').hidden = true;
    $('signin-view').hidden = false;
    $('signin-error').textContent = reason || '';
    $('token').focus();
  }

  async function onSignIn(event) {
    event.preventDefault();
    const input = $('token');
    const token = input.value.trim();
    input.value = '';
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      // Any control-plane read proves the token: 404 unknown_org still means "accepted".
      await api('GET', '/v1/orgs/console-sign-in-check');
    } catch (e) {
      if (e.status === 401) return; // signOut() already said why
      if (e.status !== 404) {
        sessionStorage.removeItem(TOKEN_KEY);
        $('signin-error').textContent = e.message;
        return;
      }
    }
    showApp();
  }

  function showApp() {
    $('signin-view').hidden = true;
    $('signin-error').textContent = '';
    $('app-view').hidden = false;
    $('signout').hidden = false;
    const wanted = new URLSearchParams(location.search).get('org');
    renderOrgPicker();
    if (wanted) openOrg(wanted);
    else if (knownOrgs().length) openOrg(knownOrgs()[0]);
    else $('new-org-name').focus();
  }

  // ---------------------------------------------------------------- orgs

  function knownOrgs() {
    try {
      const list = JSON.parse(localStorage.getItem(ORGS_KEY) || '[]');
      return Array.isArray(list) ? list.filter((o) => typeof o === 'string') : [];
    } catch (_) {
      return [];
    }
  }

  function rememberOrg(org) {
    const list = [org].concat(knownOrgs().filter((o) => o !== org)).slice(0, ORGS_MAX);
    localStorage.setItem(ORGS_KEY, JSON.stringify(list));
  }

  function renderOrgPicker() {
    const select = $('org');
    select.replaceChildren();
    const list = knownOrgs().slice().sort();
    if (!list.length) select.append(new Option('(none yet)', ''));
    for (const org of list) select.append(new Option(org, org));
    select.value = state.org && list.includes(state.org) ? state.org : '';
  }

  async function openOrg(org) {
    showError('org-error', null);
    try {
      const view = await api('GET', '/v1/orgs/' + encodeURIComponent(org));
      state.org = view.org;
      state.view = null;
      clearRows();
      rememberOrg(view.org);
      renderOrgPicker();
      history.replaceState(null, '', '?org=' + encodeURIComponent(view.org));
      $('no-org').hidden = true;
      $('org-view').hidden = false;
      resetLedger();
      render(view);
      startRefresh();
    } catch (e) {
      if (e.status !== 401) showError('org-error', e);
      renderOrgPicker();
    }
  }

  async function onCreateOrg(event) {
    event.preventDefault();
    const name = $('new-org-name').value.trim();
    try {
      const view = await api('POST', '/v1/orgs', { org: name, mode: $('new-org-mode').value });
      $('new-org-name').value = '';
      announce('Created organization ' + view.org + ' in ' + MODE_NAMES[view.mode] + ' mode.');
      await openOrg(view.org);
    } catch (e) {
      if (e.status !== 401) showError('org-error', e);
    }
  }

  function onOpenOrg(event) {
    event.preventDefault();
    const name = $('open-org-name').value.trim();
    $('open-org-name').value = '';
    if (name) openOrg(name);
  }

  // ---------------------------------------------------------------- the Workspaces tab

  function render(view) {
    state.view = view;
    if (!state.modeChangePending) $('mode').value = view.mode;
    $('mode-help').textContent = view.mode === 'shared'
      ? 'Every workspace spends from the Primary\u2019s balance; usage is still counted per workspace.'
      : 'Each workspace spends only from its own balance; assign credits with Manage Credits.';
    $('total-purchased').textContent = String(view.purchased);
    $('total-available').textContent = String(view.total_credits - view.held);
    $('total-held').textContent = String(view.held);
    $('total-used').textContent = String(view.used);
    $('workspaces-caption').textContent = 'Workspaces of ' + view.org;
    renderRows(view);
    $('refreshed').textContent = 'Updated ' + new Date().toLocaleTimeString();
    if ($('manage').open) refreshSourceOptions();
  }

  function clearRows() {
    state.rows.clear();
    $('workspaces').tBodies[0].replaceChildren();
  }

  // Rows are updated in place, keyed by workspace, so that a live refresh keeps focus and an
  // open menu where they are.
  function renderRows(view) {
    const body = $('workspaces').tBodies[0];
    const seen = new Set();
    for (const [i, ws] of view.workspaces.entries()) {
      seen.add(ws.workspace);
      let row = state.rows.get(ws.workspace);
      if (!row) {
        row = makeRow(ws.workspace);
        state.rows.set(ws.workspace, row);
      }
      // The API's order; a row already in place is not moved (moving it would drop the focus).
      if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null);
      row.cells[1].replaceChildren();
      if (ws.primary) {
        const badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = 'Primary';
        row.cells[1].append(badge);
      }
      row.cells[2].textContent = String(ws.balance);
      row.cells[3].textContent = String(ws.held);
      row.cells[4].textContent = String(ws.used);
    }
    for (const [name, row] of state.rows) {
      if (!seen.has(name)) {
        if (menuState.workspace === name) closeMenu(false);
        row.remove();
        state.rows.delete(name);
      }
    }
  }

  function makeRow(name) {
    const row = document.createElement('tr');
    const head = document.createElement('th');
    head.scope = 'row';
    head.textContent = name;
    row.append(head);
    for (const cls of ['', 'num', 'num', 'num', '']) {
      const cell = document.createElement('td');
      if (cls) cell.className = cls;
      row.append(cell);
    }
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'menu-button';
    button.textContent = '\u22EF';
    button.setAttribute('aria-label', 'Actions for ' + name);
    button.setAttribute('aria-haspopup', 'menu');
    button.setAttribute('aria-expanded', 'false');
    button.addEventListener('click', () => toggleMenu(name, button));
    button.addEventListener('keydown', (e) => {
      if (e.key === 'ArrowDown' || e.key === 'ArrowUp') {
        e.preventDefault();
        openMenu(name, button);
      }
    });
    row.cells[5].append(button);
    return row;
  }

  function workspaceView(name) {
    return state.view && state.view.workspaces.find((w) => w.workspace === name);
  }

  // ---------------------------------------------------------------- live refresh

  function startRefresh() {
    stopRefresh();
    state.refreshTimer = setTimeout(refreshTick, REFRESH_INTERVAL_MS);
  }

  function stopRefresh() {
    if (state.refreshTimer !== null) clearTimeout(state.refreshTimer);
    state.refreshTimer = null;
  }

  async function refreshTick() {
    state.refreshTimer = null;
    if (!document.hidden) await refresh();
    if (sessionStorage.getItem(TOKEN_KEY) && state.org) {
      state.refreshTimer = setTimeout(refreshTick, REFRESH_INTERVAL_MS);
    }
  }

  async function refresh() {
    if (!state.org || state.refreshing) return;
    const org = state.org;
    state.refreshing = true;
    try {
      const view = await api('GET', orgPath());
      if (org === state.org) render(view);
    } catch (e) {
      if (e.status !== 401) $('refreshed').textContent = 'Refresh failed: ' + e.message;
    } finally {
      state.refreshing = false;
    }
  }

  // ---------------------------------------------------------------- the row menu

  const menuState = { workspace: null, button: null };

  function toggleMenu(name, button) {
    if (menuState.workspace === name) closeMenu(true);
    else openMenu(name, button);
  }

  function openMenu(name, button) {
    closeMenu(false);
    const ws = workspaceView(name);
    if (!ws) return;
    const menu = $('menu');
    menu.replaceChildren();
    menu.setAttribute('aria-label', 'Actions for ' + name);
    menu.append(menuItem('Manage Credits', '', () => openManage(name)));
    if (!ws.primary) menu.append(menuItem('Delete workspace', 'danger', () => confirmDelete(name)));
    menuState.workspace = name;
    menuState.button = button;
    button.setAttribute('aria-expanded', 'true');
    menu.hidden = false;
    const r = button.getBoundingClientRect();
    menu.style.top = window.scrollY + r.bottom + 4 + 'px';
    menu.style.left = Math.max(8, window.scrollX + r.right - menu.offsetWidth) + 'px';
    menu.querySelector('[role=menuitem]').focus();
  }

  function menuItem(label, cls, action) {
    const item = document.createElement('button');
    item.type = 'button';
    item.setAttribute('role', 'menuitem');
    item.tabIndex = -1;
    item.textContent = label;
    if (cls) item.className = cls;
    item.addEventListener('click', () => {
      closeMenu(false);
      action();
    });
    return item;
  }

  function closeMenu(refocus) {
    if (menuState.button) {
      menuState.button.setAttribute('aria-expanded', 'false');
      if (refocus) menuState.button.focus();
    }
    menuState.workspace = null;
    menuState.button = null;
    $('menu').hidden = true;
  }

  function onMenuKey(event) {
    const items = Array.from($('menu').querySelectorAll('[role=menuitem]'));
    const at = items.indexOf(document.activeElement);
    const move = { ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1 }[event.key];
    if (move !== undefined) {
      event.preventDefault();
      items[(move + items.length) % items.length].focus();
    } else if (event.key === 'Escape') {
      event.preventDefault();
      closeMenu(true);
    } else if (event.key === 'Tab') {
      closeMenu(false);
    }
  }

  function onDocumentPointer(event) {
    if (menuState.workspace === null) return;
    if ($('menu').contains(event.target) || event.target === menuState.button) return;
    closeMenu(false);
  }

  // ---------------------------------------------------------------- Manage Credits

  const manage = { target: null, pending: null, previewTimer: null, previewSeq: 0, returnFocus: null };

  function openManage(target) {
    const view = state.view;
    if (!view) return;
    manage.target = target;
    manage.pending = null;
    manage.returnFocus = state.rows.get(target) && state.rows.get(target).querySelector('.menu-button');
    const budget = view.mode === 'budget';
    $('manage-title').textContent = 'Manage Credits: ' + target;
    const desc = $('manage-desc');
    desc.className = budget ? '' : 'note';
    desc.textContent = budget
      ? 'Move credits to ' + target + ' from another workspace of ' + view.org +
        '. Review the updated balances, then Transfer.'
      : 'Transfers need Workspace Budget mode. In Shared Pool mode every workspace spends from ' +
        'the Primary\u2019s balance, so there is nothing to assign: switch the Credit mode to ' +
        'Workspace Budget to give ' + target + ' a budget of its own.';
    $('manage-amount').value = '';
    showError('manage-error', null);
    refreshSourceOptions(true);
    const others = $('manage-source').options.length > 0;
    for (const id of ['manage-source', 'manage-amount', 'manage-transfer']) $(id).disabled = !budget || !others;
    if (budget && !others) desc.textContent = 'No other workspace to take credits from: create one first.';
    showPreviewHint();
    $('manage').showModal();
    (budget && others ? $('manage-source') : $('manage-cancel')).focus();
  }

  // The source choices: every other workspace with what it can give now. A live refresh only
  // rewrites the figures of the options in place, so a select the operator has open stays open
  // and keeps its selection.
  function refreshSourceOptions(reset) {
    const select = $('manage-source');
    const keep = reset ? null : select.value;
    const others = state.view.workspaces.filter((w) => w.workspace !== manage.target);
    const same = select.options.length === others.length &&
      others.every((w, i) => select.options[i].value === w.workspace);
    if (!same) select.replaceChildren(...others.map((w) => new Option(w.workspace, w.workspace)));
    others.forEach((w, i) => {
      const text = w.workspace + ' (' + w.balance + ' available)';
      if (select.options[i].text !== text) select.options[i].text = text;
    });
    if (same && !reset) return;
    const primary = state.view.primary !== manage.target ? state.view.primary : null;
    const wanted = keep || primary;
    if (wanted && others.some((w) => w.workspace === wanted)) select.value = wanted;
  }

  function showPreviewHint() {
    const p = document.createElement('p');
    p.className = 'hint';
    p.textContent = 'Enter an amount to see the updated balances.';
    $('manage-preview').replaceChildren(p);
  }

  function schedulePreview() {
    manage.pending = null;
    clearTimeout(manage.previewTimer);
    manage.previewTimer = setTimeout(preview, PREVIEW_DELAY_MS);
  }

  // Asks the API what the transfer would leave (dry_run); the answer to an older input is dropped.
  async function preview() {
    const seq = ++manage.previewSeq;
    const from = $('manage-source').value;
    const to = manage.target;
    showError('manage-error', null);
    if ($('manage-amount').value.trim() === '') return showPreviewHint();
    try {
      const amount = parseAmount($('manage-amount').value);
      const answer = await api('POST', orgPath('/transfers'), { from, to, amount, dry_run: true });
      if (seq !== manage.previewSeq) return;
      const list = document.createElement('ul');
      for (const side of [answer.from, answer.to]) {
        const before = workspaceView(side.workspace);
        const item = document.createElement('li');
        item.textContent = side.workspace + ': ' + (before ? before.balance : '?') + ' \u2192 ' + side.balance;
        list.append(item);
      }
      $('manage-preview').replaceChildren(list);
    } catch (e) {
      if (seq !== manage.previewSeq || e.status === 401) return;
      const p = document.createElement('p');
      p.className = 'hint';
      p.textContent = 'No preview: this transfer would be refused.';
      $('manage-preview').replaceChildren(p);
      showError('manage-error', e);
    }
  }

  async function onTransfer(event) {
    event.preventDefault();
    const button = $('manage-transfer');
    if (button.disabled) return;
    const from = $('manage-source').value;
    const to = manage.target;
    let amount;
    try { amount = parseAmount($('manage-amount').value); } catch (e) { return showError('manage-error', e); }
    // A retry after an unknown outcome (no answer) reuses the key, so it cannot move credits twice.
    const fingerprint = from + '\u001f' + to + '\u001f' + amount;
    if (!manage.pending || manage.pending.fingerprint !== fingerprint) manage.pending = { fingerprint, key: newKey() };
    button.disabled = true;
    showError('manage-error', null);
    try {
      await api('POST', orgPath('/transfers'), { from, to, amount, idempotency_key: manage.pending.key });
      manage.pending = null;
      $('manage').close();
      announce('Transferred ' + amount + ' credits from ' + from + ' to ' + to + '.');
      await refresh();
    } catch (e) {
      if (e.status !== 0) manage.pending = null;
      if (e.status !== 401) showError('manage-error', e);
    } finally {
      button.disabled = state.view && state.view.mode !== 'budget';
    }
  }

  function onManageClosed() {
    clearTimeout(manage.previewTimer);
    manage.previewSeq++;
    const back = manage.returnFocus;
    manage.target = null;
    if (back && back.isConnected) back.focus();
  }

  // ---------------------------------------------------------------- confirmations

  const confirmState = { action: null, onCancel: null, done: false, returnFocus: null };

  function confirmAction({ title, text, ok, danger, action, onCancel }) {
    confirmState.action = action;
    confirmState.onCancel = onCancel || null;
    confirmState.done = false;
    confirmState.returnFocus = document.activeElement;
    $('confirm-title').textContent = title;
    $('confirm-text').textContent = text;
    $('confirm-ok').textContent = ok;
    $('confirm-ok').className = danger ? 'danger' : '';
    $('confirm-ok').disabled = false;
    showError('confirm-error', null);
    $('confirm').showModal();
    $('confirm-ok').focus();
  }

  async function onConfirm(event) {
    event.preventDefault();
    const ok = $('confirm-ok');
    if (ok.disabled || !confirmState.action) return;
    ok.disabled = true;
    try {
      await confirmState.action();
      confirmState.done = true;
      $('confirm').close();
    } catch (e) {
      if (e.status !== 401) showError('confirm-error', e);
    } finally {
      ok.disabled = false;
    }
  }

  function onConfirmClosed() {
    if (!confirmState.done && confirmState.onCancel) confirmState.onCancel();
    confirmState.action = null;
    const back = confirmState.returnFocus;
    if (back && back.isConnected) back.focus();
  }

  function confirmDelete(name) {
    const view = state.view;
    const ws = workspaceView(name);
    if (!view || !ws) return;
    const returnFocus = state.rows.get(view.primary) && state.rows.get(view.primary).querySelector('.menu-button');
    confirmAction({
      title: 'Delete workspace ' + name + '?',
      text: ws.balance + ' credits return to the Primary (' + view.primary + ') when ' + name +
        ' is deleted. Its usage stays in the organization\u2019s totals. This cannot be undone.',
      ok: 'Delete workspace',
      danger: true,
      action: async () => {
        const answer = await api('DELETE', orgPath('/workspaces/' + encodeURIComponent(name)));
        render(answer);
        confirmState.returnFocus = returnFocus;
        announce('Deleted ' + name + ': ' + answer.returned_to_primary + ' credits returned to ' + answer.primary + '.');
      },
    });
  }

  function onModeChange() {
    const view = state.view;
    const wanted = $('mode').value;
    if (!view || wanted === view.mode) return;
    const others = view.workspaces.filter((w) => !w.primary).reduce((sum, w) => sum + w.balance, 0);
    const primary = workspaceView(view.primary);
    const text = wanted === 'shared'
      ? 'Switching to Shared Pool: all workspace balances return to the Primary (' + others +
        ' credits move to ' + view.primary + '), and every workspace spends from the Primary\u2019s balance.'
      : 'Switching to Workspace Budget: workspaces start at 0 until credits are assigned. The Primary (' +
        view.primary + ') keeps its ' + (primary ? primary.balance : 0) + ' credits.';
    state.modeChangePending = true;
    confirmAction({
      title: 'Switch ' + view.org + ' to ' + MODE_NAMES[wanted] + '?',
      text,
      ok: 'Switch to ' + MODE_NAMES[wanted],
      action: async () => {
        const answer = await api('PUT', orgPath('/mode'), { mode: wanted });
        state.modeChangePending = false;
        render(answer);
        announce(answer.org + ' is now in ' + MODE_NAMES[answer.mode] + ' mode.');
      },
      onCancel: () => {
        state.modeChangePending = false;
        if (state.view) $('mode').value = state.view.mode;
      },
    });
  }

  // ---------------------------------------------------------------- purchase, create workspace

  const purchase = { pending: null };

  async function onPurchase(event) {
    event.preventDefault();
    let amount;
    try { amount = parseAmount($('purchase-amount').value); } catch (e) { return showError('workspaces-error', e); }
    const fingerprint = state.org + '\u001f' + amount;
    if (!purchase.pending || purchase.pending.fingerprint !== fingerprint) purchase.pending = { fingerprint, key: newKey() };
    showError('workspaces-error', null);
    try {
      const view = await api('POST', orgPath('/credits'), { amount, idempotency_key: purchase.pending.key });
      purchase.pending = null;
      $('purchase-amount').value = '';
      render(view);
      announce('Added ' + amount + ' credits to the Primary (' + view.primary + ').');
    } catch (e) {
      if (e.status !== 0) purchase.pending = null;
      if (e.status !== 401) showError('workspaces-error', e);
    }
  }

  async function onCreateWorkspace(event) {
    event.preventDefault();
    const name = $('new-ws-name').value.trim();
    showError('workspaces-error', null);
    try {
      const view = await api('POST', orgPath('/workspaces'), { workspace: name });
      $('new-ws-name').value = '';
      render(view);
      announce('Created workspace ' + name + (view.mode === 'budget' ? ' with 0 credits.' : '.'));
    } catch (e) {
      if (e.status !== 401) showError('workspaces-error', e);
    }
  }

  // ---------------------------------------------------------------- tabs

  function selectTab(tab) {
    for (const t of document.querySelectorAll('[role=tab]')) {
      const on = t === tab;
      t.setAttribute('aria-selected', String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute('aria-controls')).hidden = !on;
    }
    if (tab.id === 'tab-ledger') loadLedger(state.ledger.after);
  }

  function onTabKey(event) {
    const tabs = Array.from(document.querySelectorAll('[role=tab]'));
    const at = tabs.indexOf(event.target);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    const tab = tabs[(to + tabs.length) % tabs.length];
    tab.focus();
    selectTab(tab);
  }

  // ---------------------------------------------------------------- the ledger

  function resetLedger() {
    state.ledger = { after: 0, previous: [], next: null };
    $('ledger').tBodies[0].replaceChildren();
    $('ledger-page').textContent = '';
    if ($('tab-ledger').getAttribute('aria-selected') === 'true') loadLedger(0);
  }

  async function loadLedger(after) {
    const seq = ++state.ledgerSeq; // only the latest request may fill the table
    showError('ledger-error', null);
    let limit;
    try { limit = parseAmount($('ledger-limit').value); } catch (e) { return showError('ledger-error', e); }
    const query = '?limit=' + limit + (after ? '&after=' + after : '');
    try {
      const page = await api('GET', orgPath('/ledger' + query));
      if (seq !== state.ledgerSeq) return;
      state.ledger.after = after;
      state.ledger.next = page.next;
      renderLedger(page.entries);
    } catch (e) {
      if (seq === state.ledgerSeq && e.status !== 401) showError('ledger-error', e);
    }
  }

  function renderLedger(entries) {
    const body = $('ledger').tBodies[0];
    body.replaceChildren();
    for (const entry of entries) {
      const row = document.createElement('tr');
      const [what, details] = describe(entry);
      for (const [text, cls] of [[String(entry.seq), 'num'], [new Date(entry.at_ms).toISOString().replace('T', ' ').slice(0, 19), ''], [what, ''], [details, '']]) {
        const cell = document.createElement('td');
        cell.textContent = text;
        if (cls) cell.className = cls;
        row.append(cell);
      }
      body.append(row);
    }
    const pageNo = state.ledger.previous.length + 1;
    $('ledger-page').textContent = 'Page ' + pageNo + (entries.length ? '' : ': no more entries');
    $('ledger-prev').disabled = state.ledger.previous.length === 0;
    $('ledger-next').disabled = state.ledger.next === null || state.ledger.next === undefined || entries.length === 0;
  }

  function describe(e) {
    const mode = (m) => MODE_NAMES[m] || m;
    switch (e.kind) {
      case 'org_created': return ['Organization created', mode(e.mode) + ' mode, Primary ' + e.primary];
      case 'purchase': return ['Purchase', e.amount + ' credits to ' + e.workspace];
      case 'transfer': return ['Transfer', e.amount + ' credits from ' + e.from + ' to ' + e.to];
      case 'workspace_created': return ['Workspace created', e.workspace];
      case 'workspace_deleted': return ['Workspace deleted', e.workspace + ': ' + e.returned_to_primary + ' credits returned to the Primary'];
      case 'mode_changed': return ['Mode changed', mode(e.from) + ' \u2192 ' + mode(e.to)];
      case 'sweep': return ['Sweep', e.amount + ' credits from ' + e.workspace + ' to ' + e.to];
      case 'usage': return ['Usage', e.amount + ' credits used by ' + e.workspace + ' (node ' + e.node + ')'];
      case 'lease_expired': return ['Lease expired', e.amount + ' credits of ' + e.workspace + ' on node ' + e.node + ' counted as used'];
      case 'lease_returned': return ['Lease returned', e.amount + ' credits of ' + e.workspace + ' from node ' + e.node];
      default: {
        const rest = Object.assign({}, e);
        for (const k of ['seq', 'at_ms', 'kind']) delete rest[k];
        return [String(e.kind), JSON.stringify(rest)];
      }
    }
  }

  function onLedgerNext() {
    if (state.ledger.next === null || state.ledger.next === undefined) return;
    state.ledger.previous.push(state.ledger.after);
    loadLedger(state.ledger.next);
  }

  function onLedgerPrevious() {
    if (!state.ledger.previous.length) return;
    loadLedger(state.ledger.previous.pop());
  }

  function onLedgerFirst() {
    state.ledger.previous = [];
    loadLedger(0);
  }

  // ---------------------------------------------------------------- wiring

  function start() {
    $('signin').addEventListener('submit', onSignIn);
    $('signout').addEventListener('click', () => signOut('Signed out.'));
    $('org').addEventListener('change', () => { if ($('org').value) openOrg($('org').value); });
    $('open-org').addEventListener('submit', onOpenOrg);
    $('create-org').addEventListener('submit', onCreateOrg);
    $('mode').addEventListener('change', onModeChange);
    $('purchase').addEventListener('submit', onPurchase);
    $('create-ws').addEventListener('submit', onCreateWorkspace);
    $('menu').addEventListener('keydown', onMenuKey);
    document.addEventListener('mousedown', onDocumentPointer);
    $('manage-form').addEventListener('submit', onTransfer);
    $('manage-source').addEventListener('change', schedulePreview);
    $('manage-amount').addEventListener('input', schedulePreview);
    $('manage-cancel').addEventListener('click', () => $('manage').close());
    $('manage').addEventListener('close', onManageClosed);
    $('confirm-form').addEventListener('submit', onConfirm);
    $('confirm-cancel').addEventListener('click', () => $('confirm').close());
    $('confirm').addEventListener('close', onConfirmClosed);
    for (const tab of document.querySelectorAll('[role=tab]')) {
      tab.addEventListener('click', () => selectTab(tab));
      tab.addEventListener('keydown', onTabKey);
    }
    $('ledger-form').addEventListener('submit', (e) => { e.preventDefault(); onLedgerFirst(); });
    $('ledger-next').addEventListener('click', onLedgerNext);
    $('ledger-prev').addEventListener('click', onLedgerPrevious);
    $('ledger-first').addEventListener('click', onLedgerFirst);
    document.addEventListener('visibilitychange', () => { if (!document.hidden) refresh(); });
    if (sessionStorage.getItem(TOKEN_KEY)) showApp();
    else signOut('');
  }

  start();
})();
