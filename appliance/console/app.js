// The console's shell: login, the caller's scope, and the hash router
// (#/machines, #/systems/NAME, …; the fragment never reaches the server).

import { api, token, ApiError } from './api.js';
import { h, put, problem } from './ui.js';

/** Who is logged in: {name, scope, operator}. Pages read `session.write`. */
export const session = { name: '', scope: '', write: false };

const pages = {
  '': () => import('./pages/overview.js'),
  machines: () => import('./pages/machines.js'),
  systems: () => import('./pages/system.js'),
  events: () => import('./pages/events.js'),
  inventory: () => import('./pages/inventory.js'),
  work: () => import('./pages/work.js'),
  tree: () => import('./pages/tree.js'),
  release: () => import('./pages/release.js'),
};

let leave = null; // the current page's cleanup (closes live streams)

async function whoami() {
  const w = await api('GET', '/api/v1/whoami');
  if (w.scope === 'anonymous') throw new ApiError(401, 'unauthorized', 'the token is not valid (revoked, expired or mistyped)');
  session.name = w.name;
  session.scope = w.scope;
  session.write = !!w.operator;
  document.body.classList.toggle('read-only', !session.write);
  put(document.getElementById('who'),
    h('span', { id: 'scope', 'data-scope': w.scope }, `${w.name} · ${w.scope}${session.write ? '' : ' (read-only)'}`),
    h('button', { type: 'button', class: 'link', id: 'logout', onclick: logout }, 'Log out'));
  document.getElementById('nav').hidden = false;
}

function logout() {
  token.clear();
  session.write = false;
  document.getElementById('nav').hidden = true;
  put(document.getElementById('who'));
  location.hash = '#/';
  login();
}

function login(err) {
  const main = document.getElementById('main');
  const input = h('input', { id: 'token', type: 'password', autocomplete: 'off', required: true, spellcheck: 'false' });
  const form = h('form', { class: 'login card', id: 'login' },
    h('h1', {}, 'Log in'),
    h('p', {}, 'Paste an API token (', h('code', {}, 'appliance token create NAME --scope read|operator|admin'),
      '). It is kept in this tab only, until you close it or log out.'),
    h('div', { class: 'field' }, h('label', { for: 'token' }, 'API token'), input),
    err ? problem(err) : null,
    h('button', { type: 'submit', class: 'primary' }, 'Log in'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    token.set(input.value.trim());
    try {
      await whoami();
      route();
    } catch (e) {
      token.clear();
      login(e);
    }
  });
  put(main, form);
  input.focus();
}

/** The page module and its split hash for `location.hash`. */
function target() {
  const [, first = '', ...rest] = location.hash.replace(/^#/, '').split('/');
  return { first, rest, load: pages[first] };
}

async function route(early) {
  if (leave) { leave(); leave = null; }
  const f = document.getElementById('flash');
  if (f.dataset.keep !== location.hash) { f.textContent = ''; f.className = 'flash'; }
  const { first, rest, load } = target();
  const main = document.getElementById('main');
  delete main.dataset.ready;
  for (const a of document.querySelectorAll('#nav a')) {
    const target = a.getAttribute('href').replace(/^#\//, '');
    const on = target === first || (first === 'systems' && target === 'machines');
    if (on) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  if (!load) { put(main, h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/' }, 'Overview'))); return; }
  put(main, h('p', { class: 'muted' }, 'Loading…'));
  try {
    const mod = await load();
    main.dataset.page = first || 'overview';
    const args = rest.map(decodeURIComponent);
    leave = (await mod.render(main, args, early && early.first === first ? early.data : undefined)) || null;
    main.dataset.ready = '1';
    // Time to interactive, since navigation start (`cargo xtask bench console`).
    window.consoleReady = window.consoleReady || performance.now();
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) { token.clear(); login(e); return; }
    put(main, h('h1', {}, 'Something failed'), problem(e));
    main.dataset.ready = '1';
  }
}

window.addEventListener('hashchange', () => { if (token.get()) route(); });

(async () => {
  if (!token.get()) { login(); return; }
  // The first page's module, and its data when it says how (`prefetch`),
  // are fetched while the token is checked: one round trip, not three.
  const t = target();
  let early = null;
  if (t.load) {
    early = {
      first: t.first,
      data: t.load().then((m) => (m.prefetch ? m.prefetch(t.rest.map(decodeURIComponent)) : undefined)),
    };
    early.data.catch(() => {}); // render sees (and shows) a failure
  }
  try {
    await whoami();
    route(early);
  } catch (e) {
    token.clear();
    login(e);
  }
})();
