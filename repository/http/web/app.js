// The repository's web page: sign in with an owner token, browse, upload and download files, run tasks
// and follow them. Plain DOM, no framework, no build step; every server string goes in as text, never as
// HTML. The token lives in sessionStorage and travels only in Authorization headers, never in a URL.

const CHUNK_BYTES = 8 * 1024 * 1024;
const UPLOAD_RETRIES = 5;
const TASK_POLL_MS = 1500;
/** A task just submitted is invisible until its workflow has validated the spec and recorded its owner. */
const TASK_APPEAR_POLLS = 40;
const OPEN_STATUSES = new Set(['RUNNING']);
const STORAGE_KEY = 'vsp.session';

/** @type {{ owner: string, token: string }} */
const session = { owner: '', token: '' };
const state = { folder: '', selectedTask: '', selectedRun: '', taskTimer: 0, specEdited: false };

const byId = (id) => /** @type {HTMLElement} */ (document.getElementById(id));

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// ---- API calls ---------------------------------------------------------------------------------------

function ownerUrl(rest) {
  return `/v1/owners/${encodeURIComponent(session.owner)}${rest}`;
}

/** A file's API path below the owner's URL. */
function filePath(path) {
  return `/files/${path.split('/').map(encodeURIComponent).join('/')}`;
}

async function errorOf(status, text) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.error === 'string') return new ApiError(status, body.error);
  } catch {
    // Not JSON: fall through to the status line.
  }
  return new ApiError(status, `the repository answered ${status}`);
}

/** A JSON API call as the signed-in owner; throws ApiError with the server's own message. */
async function api(rest, { method = 'GET', json } = {}) {
  const headers = { Authorization: `Bearer ${session.token}` };
  if (json !== undefined) headers['Content-Type'] = 'application/json';
  let res;
  try {
    res = await fetch(ownerUrl(rest), {
      method,
      headers,
      body: json === undefined ? undefined : JSON.stringify(json),
      cache: 'no-store',
    });
  } catch {
    throw new ApiError(0, 'cannot reach the repository');
  }
  if (!res.ok) throw await errorOf(res.status, await res.text());
  return res;
}

/** XMLHttpRequest, because fetch reports no upload progress. Resolves with the request once it succeeded. */
function send(method, url, body, headers, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, url);
    xhr.setRequestHeader('Authorization', `Bearer ${session.token}`);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = async () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(xhr);
      else reject(await errorOf(xhr.status, xhr.responseText));
    };
    xhr.onerror = () => reject(new ApiError(0, 'the connection to the repository broke'));
    xhr.send(body);
  });
}

// ---- formatting --------------------------------------------------------------------------------------

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = -1;
  do {
    v /= 1024;
    i++;
  } while (v >= 1024 && i < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

function timeCell(iso) {
  const t = document.createElement('time');
  t.dateTime = iso;
  t.textContent = iso ? new Date(iso).toLocaleString() : '';
  return t;
}

function element(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function button(label, onClick, attrs = {}) {
  const b = element('button', label, { type: 'button', ...attrs });
  b.addEventListener('click', onClick);
  return b;
}

function row(cells) {
  const tr = document.createElement('tr');
  for (const c of cells) {
    const td = document.createElement('td');
    if (c instanceof Node) td.append(c);
    else td.textContent = c;
    tr.append(td);
  }
  return tr;
}

function basename(path) {
  return path.slice(path.lastIndexOf('/') + 1);
}

function shellQuote(s) {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function showError(id, err) {
  byId(id).textContent = err ? (err instanceof Error ? err.message : String(err)) : '';
}

// ---- sign in -----------------------------------------------------------------------------------------

/** The first folder listing is the check of owner and token. */
async function signIn(owner, token) {
  session.owner = owner;
  session.token = token;
  try {
    await loadFolder('');
  } catch (err) {
    Object.assign(session, { owner: '', token: '' });
    if (err.status === 401) throw new Error(`Sign-in refused: ${err.message}.`);
    if (err.status === 403) throw new Error(`This token does not belong to owner ${owner}.`);
    throw err;
  }
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  byId('who-owner').textContent = owner;
  byId('who').hidden = false;
  byId('sign-in').hidden = true;
  byId('workspace').hidden = false;
  resetSpec();
  await Promise.all([loadImages(), loadTasks()]);
  byId('files-title').focus();
}

function signOut() {
  sessionStorage.removeItem(STORAGE_KEY);
  Object.assign(session, { owner: '', token: '' });
  clearTimeout(state.taskTimer);
  resetLog('');
  Object.assign(state, { folder: '', selectedTask: '', selectedRun: '', specEdited: false });
  for (const id of ['file-table', 'image-table', 'task-table'])
    byId(id).querySelector('tbody').replaceChildren();
  byId('task-detail').hidden = true;
  byId('upload-progress').hidden = true;
  for (const id of ['upload-status', 'run-status', 'files-error', 'images-error', 'tasks-error', 'run-error'])
    byId(id).textContent = '';
  /** @type {HTMLFormElement} */ (byId('sign-in-form')).reset();
  byId('who').hidden = true;
  byId('workspace').hidden = true;
  byId('sign-in').hidden = false;
  byId('owner').focus();
}

// ---- files -------------------------------------------------------------------------------------------

async function openFolder(folder) {
  showError('files-error');
  try {
    await loadFolder(folder);
  } catch (err) {
    showError('files-error', err);
  }
}

/** Lists the folder: files directly in it, and one row per subfolder with its totals. */
async function loadFolder(folder) {
  const files = (await (await api(`/files?prefix=${encodeURIComponent(folder)}`)).json()).files;
  state.folder = folder;
  renderBreadcrumbs();
  /** @type {HTMLInputElement} */ (byId('upload-path')).placeholder = `${folder}<file name>`;
  const folders = new Map();
  const here = [];
  for (const f of files) {
    const rest = f.path.slice(folder.length);
    const slash = rest.indexOf('/');
    if (slash < 0) {
      here.push(f);
      continue;
    }
    const name = rest.slice(0, slash);
    const agg = folders.get(name) ?? { count: 0, size: 0, mtime: '' };
    agg.count++;
    agg.size += f.size;
    if (f.mtime > agg.mtime) agg.mtime = f.mtime;
    folders.set(name, agg);
  }
  const rows = [];
  for (const [name, agg] of [...folders].sort(([a], [b]) => a.localeCompare(b))) {
    const open = button(`${name}/`, () => openFolder(`${folder}${name}/`), { class: 'link' });
    const tr = row([open, formatBytes(agg.size), timeCell(agg.mtime), `${agg.count} file(s)`, '']);
    tr.dataset.folder = `${folder}${name}/`;
    rows.push(tr);
  }
  for (const f of here.sort((a, b) => a.path.localeCompare(b.path))) {
    const name = element('span', basename(f.path));
    const actions = element('span', undefined, { class: 'actions' });
    actions.append(
      button('Download', () => downloadFile(f.path), { 'aria-label': `Download ${f.path}` }),
      button('Delete', () => deleteFile(f.path), { 'aria-label': `Delete ${f.path}` }),
    );
    const size = element('span', formatBytes(f.size), { title: `${f.size} bytes` });
    const tr = row([name, size, timeCell(f.mtime), element('code', f.sha256, { class: 'sha' }), actions]);
    tr.dataset.path = f.path;
    tr.dataset.sha256 = f.sha256;
    tr.dataset.size = String(f.size);
    rows.push(tr);
  }
  byId('file-table')
    .querySelector('tbody')
    .replaceChildren(...rows);
  byId('files-empty').hidden = rows.length > 0;
}

function renderBreadcrumbs() {
  const nav = byId('breadcrumbs');
  const parts = state.folder.split('/').filter(Boolean);
  const crumbs = [button('Home', () => openFolder(''), { class: 'link' })];
  parts.forEach((p, i) => {
    const target = `${parts.slice(0, i + 1).join('/')}/`;
    crumbs.push(
      document.createTextNode(' / '),
      button(p, () => openFolder(target), { class: 'link' }),
    );
  });
  crumbs[crumbs.length - 1].setAttribute('aria-current', 'location');
  nav.replaceChildren(...crumbs);
}

/** Fetched with the token, handed to the browser as a blob: the token never appears in a URL. */
async function downloadFile(path) {
  showError('files-error');
  try {
    const blob = await (await api(filePath(path))).blob();
    const url = URL.createObjectURL(blob);
    const a = element('a', undefined, { href: url, download: basename(path), hidden: '' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    showError('files-error', err);
  }
}

async function deleteFile(path) {
  if (!confirm(`Delete ${path}?`)) return;
  try {
    await api(filePath(path), { method: 'DELETE' });
    await openFolder(state.folder);
  } catch (err) {
    showError('files-error', err);
  }
}

function setProgress(done, total) {
  const bar = /** @type {HTMLProgressElement} */ (byId('upload-progress'));
  const pct = total === 0 ? 100 : Math.floor((done / total) * 100);
  bar.hidden = false;
  bar.value = pct;
  byId('upload-status').textContent = `${pct}% (${formatBytes(done)} of ${formatBytes(total)})`;
}

/**
 * Resumable upload in chunks (POST a session, PATCH each chunk at its offset): a dropped connection
 * costs one chunk, and the upload continues from the offset the repository reports.
 */
async function uploadFile(file, path) {
  setProgress(0, file.size);
  if (file.size === 0) {
    const xhr = await send('PUT', ownerUrl(filePath(path)), file, {}, () => undefined);
    return JSON.parse(xhr.responseText);
  }
  const { id } = await (await api('/uploads', { method: 'POST', json: { path, size: file.size } })).json();
  const sessionUrl = ownerUrl(`/uploads/${encodeURIComponent(id)}`);
  let offset = 0;
  let failures = 0;
  try {
    for (;;) {
      const end = Math.min(offset + CHUNK_BYTES, file.size);
      const start = offset;
      try {
        const xhr = await send(
          'PATCH',
          sessionUrl,
          file.slice(start, end),
          { 'Upload-Offset': String(start), 'Content-Type': 'application/offset+octet-stream' },
          (loaded) => setProgress(start + loaded, file.size),
        );
        offset = Number(xhr.getResponseHeader('Upload-Offset') ?? end);
        setProgress(offset, file.size);
        if (xhr.status === 201) return JSON.parse(xhr.responseText);
        failures = 0;
      } catch (err) {
        // Broken connection or offset mismatch: ask where the upload stands and go on from there.
        if ((err.status !== 0 && err.status !== 409) || ++failures > UPLOAD_RETRIES) throw err;
        await new Promise((r) => setTimeout(r, 500 * failures));
        const head = await fetch(sessionUrl, {
          method: 'HEAD',
          headers: { Authorization: `Bearer ${session.token}` },
          cache: 'no-store',
        });
        if (!head.ok) throw err;
        offset = Number(head.headers.get('Upload-Offset'));
      }
    }
  } catch (err) {
    await fetch(sessionUrl, {
      method: 'DELETE',
      headers: { Authorization: `Bearer ${session.token}` },
    }).catch(() => undefined);
    throw err;
  }
}

async function onUpload(event) {
  event.preventDefault();
  const input = /** @type {HTMLInputElement} */ (byId('upload-file'));
  const file = input.files && input.files[0];
  if (!file) return;
  const pathInput = /** @type {HTMLInputElement} */ (byId('upload-path'));
  const path = pathInput.value.trim() || `${state.folder}${file.name}`;
  const submit = /** @type {HTMLButtonElement} */ (byId('upload-button'));
  submit.disabled = true;
  showError('files-error');
  try {
    const info = await uploadFile(file, path);
    byId('upload-progress').dataset.state = 'done';
    byId('upload-status').textContent = `Uploaded ${info.path} (${formatBytes(info.size)}).`;
    input.value = '';
    pathInput.value = '';
    if (!state.specEdited) resetSpec(info.path);
    const slash = info.path.lastIndexOf('/');
    await Promise.all([openFolder(slash < 0 ? '' : info.path.slice(0, slash + 1)), loadImages()]);
  } catch (err) {
    byId('upload-progress').dataset.state = 'failed';
    byId('upload-status').textContent = 'Upload failed.';
    showError('files-error', err);
  } finally {
    submit.disabled = false;
  }
}

// ---- VM images ---------------------------------------------------------------------------------------

/** The owner's images (files under images/) and the provider's base images, as the image store sees them. */
async function loadImages() {
  showError('images-error');
  let images;
  try {
    images = (await (await api('/images')).json()).images;
  } catch (err) {
    showError('images-error', err);
    return;
  }
  const rows = images.map((im) => {
    const use = button('Use in task', () => useImage(im.name), {
      'aria-label': `Use ${im.name} in the task spec`,
    });
    if (im.status !== 'ok') use.disabled = true;
    const size =
      im.virtualBytes === undefined
        ? formatBytes(im.bytes)
        : `${formatBytes(im.virtualBytes)} (file ${formatBytes(im.bytes)})`;
    const status = im.error ? `${im.status}: ${im.error}` : im.status;
    const tr = row([
      element('code', im.name),
      im.origin,
      im.format ?? '',
      size,
      status,
      element('code', im.sha256, { class: 'sha' }),
      use,
    ]);
    tr.dataset.image = im.name;
    return tr;
  });
  byId('image-table')
    .querySelector('tbody')
    .replaceChildren(...rows);
  byId('images-empty').hidden = rows.length > 0;
}

/** Puts the image into the spec in the form, keeping the rest of what is there. */
function useImage(name) {
  const area = /** @type {HTMLTextAreaElement} */ (byId('spec'));
  let spec;
  try {
    spec = JSON.parse(area.value);
  } catch {
    spec = {};
  }
  area.value = JSON.stringify({ ...spec, image: name }, null, 2);
  state.specEdited = true;
  area.focus();
}

// ---- tasks -------------------------------------------------------------------------------------------

/** A spec that runs anywhere; after an upload, one that reads the uploaded file. */
function resetSpec(input) {
  const spec = input
    ? {
        name: 'checksum',
        inputs: [input],
        command: `mkdir -p out && sha256sum ${shellQuote(input)} > out/sha256.txt`,
      }
    : { name: 'hello', inputs: [], command: 'mkdir -p out && date -u > out/hello.txt' };
  /** @type {HTMLTextAreaElement} */ (byId('spec')).value = JSON.stringify(spec, null, 2);
  state.specEdited = false;
}

async function loadTasks() {
  showError('tasks-error');
  let tasks;
  try {
    tasks = (await (await api('/tasks')).json()).tasks;
  } catch (err) {
    showError('tasks-error', err);
    return;
  }
  // One row per run: a task id used again is another run, opened as itself.
  const rows = tasks.map((t) => {
    const open = button(t.taskId, () => selectTask(t.taskId, t.runId), {
      class: 'link',
      'aria-label': `Show task ${t.taskId} run ${t.runId}`,
    });
    // The tail: run ids begin with the time (UUIDv7), so their heads look alike.
    const run = element('code', t.runId.slice(-8), { title: t.runId });
    const tr = row([open, run, t.phase ?? '', t.status, t.host ?? '', timeCell(t.startTime)]);
    tr.dataset.taskId = t.taskId;
    tr.dataset.runId = t.runId;
    tr.dataset.phase = t.phase ?? '';
    if (t.taskId === state.selectedTask && t.runId === state.selectedRun)
      tr.setAttribute('aria-current', 'true');
    return tr;
  });
  byId('task-table')
    .querySelector('tbody')
    .replaceChildren(...rows);
  byId('tasks-empty').hidden = rows.length > 0;
}

const SPEC_REFUSED = 'invalid task spec: ';

/** A refusal of the spec as a list of `field: reason`; any other error as its message. */
function showRunError(err) {
  const msg = err instanceof Error ? err.message : String(err);
  const box = byId('run-error');
  if (!msg.startsWith(SPEC_REFUSED)) {
    box.textContent = msg;
    return;
  }
  const items = msg
    .slice(SPEC_REFUSED.length)
    .split('; ')
    .map((issue) => {
      const colon = issue.indexOf(': ');
      const li = element('li');
      if (colon < 0) li.textContent = issue;
      else li.append(element('code', issue.slice(0, colon)), `: ${issue.slice(colon + 2)}`);
      return li;
    });
  const list = element('ul');
  list.append(...items);
  box.replaceChildren(element('p', 'The task spec was refused; fix these fields and run it again:'), list);
}

async function onRun(event) {
  event.preventDefault();
  showError('run-error');
  let spec;
  try {
    spec = JSON.parse(/** @type {HTMLTextAreaElement} */ (byId('spec')).value);
  } catch (err) {
    showError('run-error', `The spec is not valid JSON: ${err.message}`);
    return;
  }
  const submit = /** @type {HTMLButtonElement} */ (byId('run-button'));
  submit.disabled = true;
  try {
    const { taskId, runId } = await (await api('/tasks', { method: 'POST', json: spec })).json();
    byId('run-status').textContent = `Started ${taskId}.`;
    await selectTask(taskId, runId);
  } catch (err) {
    showRunError(err);
  } finally {
    submit.disabled = false;
  }
}

function fileList(id, files) {
  byId(id).replaceChildren(
    ...(files ?? []).map((f) => {
      const li = element('li', undefined, { 'data-path': f.path, 'data-sha256': f.sha256 });
      li.append(
        element('code', f.path),
        ` (${formatBytes(f.size)}) `,
        button('Download', () => downloadFile(f.path), { 'aria-label': `Download ${f.path}` }),
        ' ',
        button('Show in files', () => openFolder(f.path.slice(0, f.path.lastIndexOf('/') + 1)), {
          'aria-label': `Show ${f.path} in files`,
        }),
      );
      return li;
    }),
  );
}

function formatDuration(ms) {
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

const END_PHASES = new Set(['completed', 'failed', 'cancelled']);

/** When each phase began and how long it took; the current one counts up while the task runs. */
function renderPhases(task) {
  const began = Object.entries(task.timestamps ?? {}).sort(([, a], [, b]) => a.localeCompare(b));
  const rows = began.map(([phase, iso], i) => {
    const next = began[i + 1]?.[1];
    let took = '';
    if (next) took = formatDuration(Date.parse(next) - Date.parse(iso));
    else if (!END_PHASES.has(phase) && OPEN_STATUSES.has(task.status))
      took = `${formatDuration(Date.now() - Date.parse(iso))} so far`;
    const tr = row([phase, timeCell(iso), took]);
    tr.dataset.phase = phase;
    return tr;
  });
  byId('task-phases')
    .querySelector('tbody')
    .replaceChildren(...rows);
}

/** The bar and its words; a task that ended without completing keeps the last progress it reported. */
function renderProgress(task) {
  const bar = /** @type {HTMLProgressElement} */ (byId('task-progress'));
  const done = task.status === 'COMPLETED';
  const reported = typeof task.progress === 'number';
  const pct = done ? 100 : reported ? Math.round(task.progress) : Number(bar.dataset.progress ?? 0);
  const words = done ? 'done' : reported ? (task.progressMessage ?? '') : (bar.dataset.message ?? '');
  bar.value = pct;
  bar.dataset.progress = String(pct);
  bar.dataset.message = words;
  byId('task-progress-text').textContent =
    `${pct}%${words ? ` ${words}` : ''}` +
    (OPEN_STATUSES.has(task.status) ? '' : ` (${task.status.toLowerCase()})`);
}

// ---- the task's log: streamed while it runs, read whole once it has ended ------------------------------

/** Keeps the viewer's text bounded; the whole log is under Logs once the task ends. */
const LOG_KEEP_CHARS = 1_000_000;
const log = { key: '', bytes: 0, done: false, ctrl: /** @type {AbortController | undefined} */ (undefined) };

function resetLog(key) {
  log.ctrl?.abort();
  Object.assign(log, { key, bytes: 0, done: false, ctrl: undefined });
  byId('task-log').textContent = '';
  byId('task-log-state').textContent = '';
}

function appendLog(text) {
  const pre = byId('task-log');
  const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  let all = (pre.textContent ?? '') + text;
  if (all.length > LOG_KEEP_CHARS) all = `[earlier output cut]\n${all.slice(-LOG_KEEP_CHARS)}`;
  pre.textContent = all;
  if (atEnd) pre.scrollTop = pre.scrollHeight;
}

/**
 * Reads the log from where it stopped: with `follow` the repository keeps the response open and sends new
 * output until the task ends. A broken stream is taken up again at the next poll, from its byte offset.
 */
async function readLog(taskId, follow) {
  const key = log.key;
  const ctrl = new AbortController();
  log.ctrl = ctrl;
  byId('task-log-state').textContent = follow ? 'live' : '';
  try {
    const res = await fetch(
      ownerUrl(`/tasks/${encodeURIComponent(taskId)}/logs?offset=${log.bytes}${follow ? '&follow=1' : ''}`),
      { headers: { Authorization: `Bearer ${session.token}` }, cache: 'no-store', signal: ctrl.signal },
    );
    if (!res.ok) {
      const err = await errorOf(res.status, await res.text());
      if (log.key !== key) return;
      log.done = true;
      byId('task-log-state').textContent =
        res.status === 404 ? 'no output recorded for this task' : `log unavailable: ${err.message}`;
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (log.key !== key) return;
      if (done) break;
      log.bytes += value.byteLength;
      appendLog(decoder.decode(value, { stream: true }));
    }
    appendLog(decoder.decode());
    // The repository ends a followed log when the task has ended: the log is whole.
    log.done = true;
    byId('task-log-state').textContent = 'ended';
  } catch {
    if (log.key === key) byId('task-log-state').textContent = follow ? 'reconnecting…' : 'log unavailable';
  } finally {
    if (log.ctrl === ctrl) log.ctrl = undefined;
  }
}

/**
 * An ended run's output: its stored `logs/task.log` (whole, and this run's own, where the live route
 * serves the latest run of the id).
 */
async function readStoredLog(task) {
  const key = log.key;
  log.done = true;
  let text;
  try {
    text = await (
      await api(filePath(`${task.resultsPath ?? `results/${task.taskId}`}/logs/task.log`))
    ).text();
  } catch (err) {
    if (log.key === key)
      byId('task-log-state').textContent =
        err.status === 404 ? 'no output recorded for this run' : `log unavailable: ${err.message}`;
    return;
  }
  if (log.key !== key) return;
  byId('task-log').textContent = '';
  appendLog(text);
  byId('task-log-state').textContent = 'ended';
}

/**
 * Follows a running task's output (the live route, which serves the id's latest run: a running run is
 * that); an ended run opened as such shows its stored log. A run followed to its end keeps what the live
 * route sent.
 */
function followLog(task) {
  if (log.ctrl || log.done) return;
  if (OPEN_STATUSES.has(task.status)) void readLog(task.taskId, true);
  else if (log.bytes === 0) void readStoredLog(task);
  // A followed stream broke before the end: the rest, from where it stopped.
  else void readLog(task.taskId, false);
}

/**
 * A task that did not complete has no result to list its logs: they are in its results folder
 * (`logs/task.log`, `logs/failure.txt`), and failure.txt is shown as it is.
 */
async function showFailureFiles(task) {
  const folder = `${task.resultsPath ?? `results/${task.taskId}`}/logs/`;
  let files;
  try {
    files = (await (await api(`/files?prefix=${encodeURIComponent(folder)}`)).json()).files;
  } catch {
    return;
  }
  if (state.selectedTask !== task.taskId || state.selectedRun !== task.runId) return;
  fileList('task-logs', files);
  const failure = files.find((f) => f.path === `${folder}failure.txt`);
  if (!failure) return;
  const text = await (await api(filePath(failure.path))).text().catch(() => '');
  const box = byId('task-failure');
  box.textContent = text;
  box.hidden = text === '';
}

async function cancelTask() {
  const taskId = state.selectedTask;
  if (!confirm(`Cancel task ${taskId}? Its VM is stopped; its logs are kept.`)) return;
  const cancel = /** @type {HTMLButtonElement} */ (byId('task-cancel'));
  cancel.disabled = true;
  byId('task-cancel-status').textContent = 'Cancelling…';
  try {
    await api(`/tasks/${encodeURIComponent(taskId)}/cancel`, {
      method: 'POST',
      json: { reason: `cancelled by ${session.owner} on the web page` },
    });
    byId('task-cancel-status').textContent = 'Cancelled.';
  } catch (err) {
    byId('task-cancel-status').textContent = '';
    byId('task-detail-error').textContent = `Cancel failed: ${err.message}`;
  } finally {
    cancel.disabled = false;
  }
  if (state.selectedTask === taskId) {
    clearTimeout(state.taskTimer);
    await pollTask(taskId, state.selectedRun, 0, '');
  }
}

/** Shows one run of a task (the latest when `runId` is not known yet) and follows it until it ends. */
async function selectTask(taskId, runId) {
  clearTimeout(state.taskTimer);
  state.selectedTask = taskId;
  state.selectedRun = runId ?? '';
  const detail = byId('task-detail');
  detail.hidden = false;
  delete detail.dataset.status;
  byId('task-detail-id').textContent = taskId;
  for (const id of ['status', 'phase', 'run', 'host', 'exit', 'results', 'error'])
    byId(`task-detail-${id}`).textContent = '';
  for (const id of ['task-progress-text', 'task-cancel-status']) byId(id).textContent = '';
  const bar = /** @type {HTMLProgressElement} */ (byId('task-progress'));
  bar.value = 0;
  delete bar.dataset.progress;
  delete bar.dataset.message;
  byId('task-failure').hidden = true;
  byId('task-cancel').hidden = true;
  fileList('task-outputs', []);
  fileList('task-logs', []);
  renderPhases({ status: '' });
  resetLog(`${taskId}/${runId ?? ''}`);
  await pollTask(taskId, state.selectedRun, 0, '');
}

async function pollTask(taskId, runId, attempt, seen) {
  const current = () => state.selectedTask === taskId && state.selectedRun === runId;
  if (!current()) return;
  let task;
  try {
    const run = runId ? `?runId=${encodeURIComponent(runId)}` : '';
    task = await (await api(`/tasks/${encodeURIComponent(taskId)}${run}`)).json();
  } catch (err) {
    if (err.status === 404 && attempt < TASK_APPEAR_POLLS) {
      byId('task-detail-status').textContent = 'waiting for the task to start…';
      state.taskTimer = setTimeout(() => pollTask(taskId, runId, attempt + 1, seen), TASK_POLL_MS);
      return;
    }
    byId('task-detail-error').textContent = err.message;
    return;
  }
  if (!current()) return;
  if (!runId) {
    // Opened by id alone: from now on this run, even if the id is used again.
    state.selectedRun = runId = task.runId;
    log.key = `${taskId}/${runId}`;
  }
  const detail = byId('task-detail');
  detail.dataset.status = task.status;
  detail.dataset.phase = task.phase ?? '';
  detail.dataset.runId = task.runId;
  byId('task-detail-status').textContent = task.status;
  byId('task-detail-run').textContent = task.runId;
  const q = task.queue;
  byId('task-detail-phase').textContent =
    (task.phase ?? '') + (q ? ` (${q.position} of ${q.of} in the queue${q.why ? `: ${q.why}` : ''})` : '');
  byId('task-detail-host').textContent = task.host ?? '';
  byId('task-detail-exit').textContent = task.exitCode === undefined ? '' : String(task.exitCode);
  const results = byId('task-detail-results');
  results.replaceChildren();
  if (task.resultsPath)
    results.append(button(task.resultsPath, () => openFolder(`${task.resultsPath}/`), { class: 'link' }));
  byId('task-detail-error').textContent = task.error ?? '';
  const open = OPEN_STATUSES.has(task.status);
  byId('task-cancel').hidden = !open || END_PHASES.has(task.phase ?? '');
  renderProgress(task);
  renderPhases(task);
  fileList('task-outputs', task.outputs);
  followLog(task);
  const key = `${task.status}/${task.phase}`;
  if (task.status === 'COMPLETED') fileList('task-logs', task.logs);
  else if (!open && key !== seen) await showFailureFiles(task);
  if (key !== seen) await loadTasks();
  if (open) {
    state.taskTimer = setTimeout(() => pollTask(taskId, runId, 0, key), TASK_POLL_MS);
  } else if (key !== seen) {
    await openFolder(state.folder);
  }
}

// ---- start -------------------------------------------------------------------------------------------

byId('sign-in-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  showError('sign-in-error');
  const owner = /** @type {HTMLInputElement} */ (byId('owner')).value.trim();
  const token = /** @type {HTMLInputElement} */ (byId('token')).value.trim();
  try {
    await signIn(owner, token);
  } catch (err) {
    showError('sign-in-error', err);
  }
});
byId('sign-out').addEventListener('click', signOut);
byId('upload-form').addEventListener('submit', onUpload);
byId('run-form').addEventListener('submit', onRun);
byId('refresh-tasks').addEventListener('click', loadTasks);
byId('task-cancel').addEventListener('click', cancelTask);
byId('spec').addEventListener('input', () => (state.specEdited = true));

const saved = sessionStorage.getItem(STORAGE_KEY);
if (saved) {
  const { owner, token } = JSON.parse(saved);
  signIn(owner, token).catch((err) => {
    sessionStorage.removeItem(STORAGE_KEY);
    showError('sign-in-error', err);
  });
}
