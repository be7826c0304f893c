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
const state = { folder: '', selectedTask: '', taskTimer: 0, specEdited: false };

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
  Object.assign(state, { folder: '', selectedTask: '', specEdited: false });
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
  const rows = tasks.map((t) => {
    const open = button(t.taskId, () => selectTask(t.taskId), {
      class: 'link',
      'aria-label': `Show task ${t.taskId}`,
    });
    const tr = row([open, t.phase ?? '', t.status, t.host ?? '', timeCell(t.startTime)]);
    tr.dataset.taskId = t.taskId;
    tr.dataset.phase = t.phase ?? '';
    return tr;
  });
  byId('task-table')
    .querySelector('tbody')
    .replaceChildren(...rows);
  byId('tasks-empty').hidden = rows.length > 0;
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
    const { taskId } = await (await api('/tasks', { method: 'POST', json: spec })).json();
    byId('run-status').textContent = `Started ${taskId}.`;
    await selectTask(taskId);
  } catch (err) {
    showError('run-error', err);
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

/** Shows one task and follows it until it ends. */
async function selectTask(taskId) {
  clearTimeout(state.taskTimer);
  state.selectedTask = taskId;
  const detail = byId('task-detail');
  detail.hidden = false;
  byId('task-detail-id').textContent = taskId;
  for (const id of ['status', 'phase', 'host', 'exit', 'results', 'error'])
    byId(`task-detail-${id}`).textContent = '';
  fileList('task-outputs', []);
  fileList('task-logs', []);
  await pollTask(taskId, 0, '');
}

async function pollTask(taskId, attempt, seen) {
  if (state.selectedTask !== taskId) return;
  let task;
  try {
    task = await (await api(`/tasks/${encodeURIComponent(taskId)}`)).json();
  } catch (err) {
    if (err.status === 404 && attempt < TASK_APPEAR_POLLS) {
      byId('task-detail-status').textContent = 'waiting for the task to start…';
      state.taskTimer = setTimeout(() => pollTask(taskId, attempt + 1, seen), TASK_POLL_MS);
      return;
    }
    byId('task-detail-error').textContent = err.message;
    return;
  }
  if (state.selectedTask !== taskId) return;
  const detail = byId('task-detail');
  detail.dataset.status = task.status;
  detail.dataset.phase = task.phase ?? '';
  byId('task-detail-status').textContent = task.status;
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
  fileList('task-outputs', task.outputs);
  fileList('task-logs', task.logs);
  const key = `${task.status}/${task.phase}`;
  if (key !== seen) await loadTasks();
  if (OPEN_STATUSES.has(task.status)) {
    state.taskTimer = setTimeout(() => pollTask(taskId, 0, key), TASK_POLL_MS);
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
byId('spec').addEventListener('input', () => (state.specEdited = true));

const saved = sessionStorage.getItem(STORAGE_KEY);
if (saved) {
  const { owner, token } = JSON.parse(saved);
  signIn(owner, token).catch((err) => {
    sessionStorage.removeItem(STORAGE_KEY);
    showError('sign-in-error', err);
  });
}
