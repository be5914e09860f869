// Drives the real ComfyUI frontend (comfyui-frontend-package, served by the host) in headless Chromium the way a
// user does: open the page, drop a UI workflow file onto the canvas, look for the missing-node dialog and error
// badges, shrink the image size in the loaded graph, click Run, wait for the image (or, for a workflow with text
// outputs only, for the text in its Preview Any nodes). Used by tests/test_browser.py,
// which asserts on the single JSON line this prints (every check is reported, none decided here, so the test
// shows all that went wrong at once).
//
// node drop_and_queue.mjs --url http://127.0.0.1:PORT --workflow workflows/x.json --out DIR [--size 64]
//                         [--chromium /usr/bin/chromium] [--timeout-s 90] [--no-run]
// --no-run stops after the drop checks (for a workflow that must fail to load).
import { readFileSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'
import { parseArgs } from 'node:util'
import { chromium } from 'playwright-core'

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    workflow: { type: 'string' },
    out: { type: 'string' },
    size: { type: 'string', default: '64' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    'timeout-s': { type: 'string', default: '90' },
    'no-run': { type: 'boolean', default: false }
  }
})
for (const key of ['url', 'workflow', 'out']) if (!args[key]) throw new Error(`--${key} is required`)
const size = Number(args.size)
const timeout = 1000 * Number(args['timeout-s'])
const name = basename(args.workflow)
const stem = name.replace(/\.json$/, '')
const text = readFileSync(args.workflow, 'utf8')
const workflow = JSON.parse(text)
mkdirSync(args.out, { recursive: true })

const result = {
  workflow: name, stage: 'start', expected_types: workflow.nodes.map((n) => n.type).sort(), screenshots: [],
  console_errors: [], page_errors: [], failed_requests: [], dismissed_dialogs: []
}
const emit = () => console.log(JSON.stringify(result))

// Settings a user who has opened ComfyUI before has (stored by the host under its user folder, through the
// frontend's own /api/settings route): no first-run template browser; the missing-node and missing-model
// warnings explicitly on, so a default that changes cannot silence them.
async function presetSettings(request) {
  const settings = {
    'Comfy.TutorialCompleted': true,
    'Comfy.Workflow.ShowMissingNodesWarning': true,
    'Comfy.Workflow.ShowMissingModelsWarning': true
  }
  const res = await request.post(`${args.url}/api/settings`, { data: settings })
  if (!res.ok()) throw new Error(`POST /api/settings answered ${res.status()}`)
}

// Visible dialogs and error/warning toasts, as {kind, text}.
const visibleProblems = (page) =>
  page.evaluate(() => {
    const shown = (el) => !!(el.offsetWidth || el.offsetHeight || el.getClientRects().length)
    const out = []
    for (const el of document.querySelectorAll('.p-dialog')) {
      if (!shown(el)) continue
      out.push({
        kind: el.querySelector('.comfy-missing-nodes') ? 'missing-nodes'
          : el.querySelector('.comfy-missing-models') ? 'missing-models' : 'dialog',
        text: el.innerText.trim().slice(0, 1500)
      })
    }
    for (const el of document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn')) {
      if (shown(el)) out.push({ kind: 'toast', text: el.innerText.trim().slice(0, 1500) })
    }
    return out
  })

// Node-level trouble the canvas shows: unknown types (red "missing" nodes, has_errors) and the red outlines
// that come from the server's node_errors (app.lastNodeErrors) or an execution error.
const nodeProblems = (page) =>
  page.evaluate(() => {
    const app = window.app
    const out = []
    for (const node of app.graph.nodes) {
      if (node.has_errors) out.push(`node ${node.id} (${node.type}) has_errors`)
      if (!window.LiteGraph.registered_node_types[node.type]) out.push(`node ${node.id}: unknown type ${node.type}`)
    }
    if (app.lastNodeErrors && Object.keys(app.lastNodeErrors).length) {
      out.push(`node errors: ${JSON.stringify(app.lastNodeErrors).slice(0, 2000)}`)
    }
    if (app.lastExecutionError) out.push(`execution error: ${JSON.stringify(app.lastExecutionError).slice(0, 2000)}`)
    return out
  })

// Close every open dialog (Escape, then its close button); return what they said.
async function closeDialogs(page) {
  const closed = (await visibleProblems(page)).filter((p) => p.kind !== 'toast')
  for (let i = 0; i < closed.length; i++) {
    await page.keyboard.press('Escape')
    const open = page.locator('.p-dialog:visible').last()
    if (await open.count()) {
      await open.locator('.p-dialog-close-button, button[aria-label="Close"]').first().click({ timeout: 5000 })
        .catch(() => {})
    }
  }
  await page.locator('.p-dialog:visible').first().waitFor({ state: 'detached', timeout: 5000 }).catch(() => {})
  return closed
}

async function shot(page, label) {
  const path = join(args.out, `${stem}-${label}.png`)
  await page.screenshot({ path })
  result.screenshots.push(path)
}

async function drive(page) {
  result.stage = 'page'
  await presetSettings(page.request)
  await page.goto(args.url)
  await page.locator('#graph-canvas').waitFor({ state: 'visible' })
  await page.waitForFunction(() => window.app?.graph && window.app.vueAppReady)
  await page.getByTestId('queue-button').waitFor({ state: 'visible' })
  result.frontend_version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null)
  // Anything open before the drop (a first-run or what's-new dialog) is closed and listed, not failed on:
  // nothing of ours is on the canvas yet. Error toasts stay and are reported below.
  result.dismissed_dialogs = await closeDialogs(page)

  result.stage = 'drop'
  const canvas = page.locator('#graph-canvas')
  const box = await canvas.boundingBox()
  await page.evaluate(
    ({ text, name, x, y }) => {
      const data = new DataTransfer()
      data.items.add(new File([text], name, { type: 'application/json' }))
      const el = document.querySelector('#graph-canvas')
      for (const type of ['dragenter', 'dragover', 'drop']) {
        el.dispatchEvent(new DragEvent(type, { bubbles: true, cancelable: true, composed: true, dataTransfer: data,
          clientX: x, clientY: y }))
      }
    },
    { text, name, x: box.x + box.width * 0.8, y: box.y + box.height * 0.9 }
  )
  const expected = result.expected_types.join(',')
  // Loaded: the file's node types on the canvas, its tab active, the drop handler's spinner off (it stays on until
  // handleFile has shown any missing-node/model dialog); then a moment for Vue to render those dialogs.
  result.loaded_as = await page
    .waitForFunction(({ want, stem }) => {
      const ws = window.app.extensionManager
      const active = ws.workflow.activeWorkflow?.filename
      const types = window.app.graph.nodes.map((n) => n.type).sort().join(',')
      return types === want && active === stem && !ws.spinner && active
    }, { want: expected, stem }, { timeout: 20000 })
    .then((h) => h.jsonValue())
    .catch(() => page.evaluate(() => window.app.extensionManager.workflow.activeWorkflow?.filename ?? null))
  await page.waitForTimeout(500)
  const loaded = await page.evaluate(() => {
    const g = window.app.graph.serialize()
    return { types: g.nodes.map((n) => n.type).sort(), widgets: Object.fromEntries(g.nodes.map((n) =>
      [n.id, n.widgets_values ?? null])) }
  })
  result.loaded_types = loaded.types
  // What the frontend made of each node's widgets (widgets_values after load and re-serialise) next to the file:
  // a shifted or dropped value shows as a mismatch. Values the frontend appends for widgets of its own (LoadImage's
  // upload button) are listed apart.
  const same = (a, b) => JSON.stringify(a) === JSON.stringify(b)
  result.widget_mismatches = []
  result.widget_extras = []
  for (const n of workflow.nodes) {
    const file = n.widgets_values ?? []
    const got = loaded.widgets[n.id] ?? []
    if (!same(got.slice(0, file.length), file)) result.widget_mismatches.push({ id: n.id, type: n.type, file, loaded: got })
    else if (got.length > file.length) result.widget_extras.push({ id: n.id, type: n.type, file, loaded: got })
  }
  result.after_drop = { dialogs: await visibleProblems(page), nodes: await nodeProblems(page) }
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'))
  await page.waitForTimeout(300)
  await shot(page, 'loaded')
  if (args['no-run']) return
  await closeDialogs(page) // already reported; closed so that the run still shows what else is wrong

  // The image size, in the loaded graph only (the file is dropped as it is): width/height widgets of
  // EmptySD3LatentImage and of any resize node (ImageScale and the like) go to --size.
  result.stage = 'resize'
  result.resized = await page.evaluate((size) => {
    const changed = []
    for (const node of window.app.graph.nodes) {
      for (const w of node.widgets ?? []) {
        if (w.name === 'width' || w.name === 'height') {
          changed.push(`${node.id}:${node.type}.${w.name} ${w.value}->${size}`)
          w.value = size
          w.callback?.(size)
        }
      }
    }
    window.app.graph.setDirtyCanvas(true, true)
    return changed
  }, size)

  result.stage = 'run'
  // The server's own word on the run, as the frontend hears it over its websocket.
  await page.evaluate(() => {
    const heard = (window.__zimage = { executed: [], finished: {} })
    const api = window.app.api
    api.addEventListener('executed', (e) => heard.executed.push(e.detail))
    api.addEventListener('execution_success', (e) => (heard.finished[e.detail.prompt_id] = 'success'))
    api.addEventListener('execution_error', (e) => (heard.finished[e.detail.prompt_id] = e.detail))
  })
  const run = page.getByTestId('queue-button').getByRole('button', { name: 'Run', exact: true })
  const [response] = await Promise.all([
    page.waitForResponse((r) => r.url().endsWith('/api/prompt') && r.request().method() === 'POST',
      { timeout: 30000 }),
    run.click({ timeout: 15000 })
  ])
  const answer = await response.json().catch(() => ({}))
  result.prompt_status = response.status()
  result.prompt_id = answer.prompt_id ?? null
  result.prompt_node_errors = answer.node_errors ?? null
  const sent = JSON.parse(response.request().postData() ?? '{}').prompt ?? {}
  result.sent_sizes = Object.fromEntries(Object.entries(sent).filter(([, v]) => 'width' in (v.inputs ?? {}))
    .map(([id, v]) => [id, [v.inputs.width, v.inputs.height]]))

  result.stage = 'execute'
  const id = result.prompt_id
  result.finished = await page
    .waitForFunction((id) => window.__zimage.finished[id], id, { timeout, polling: 250 })
    .then((h) => h.jsonValue())
  result.ui_outputs = await page.evaluate((id) => window.__zimage.executed.filter((d) => d.prompt_id === id)
    .flatMap((d) => (d.output?.images ?? []).map((img) => ({ node: String(d.display_node ?? d.node), ...img }))), id)
  result.ui_texts = await page.evaluate((id) => window.__zimage.executed.filter((d) => d.prompt_id === id)
    .flatMap((d) => (d.output?.text ?? []).map((text) => ({ node: String(d.display_node ?? d.node), text }))), id)
  if (!result.ui_outputs.length) return showTexts(page)

  // Each output image drawn in its node on the canvas: the node's <img> has loaded that file's /view URL.
  result.stage = 'image'
  result.node_images = []
  for (const out of result.ui_outputs) {
    const shown = await page
      .waitForFunction(({ node, filename }) => {
        // a batch: the node holds one <img> per image (it draws them as a grid or one at a time)
        const img = window.app.graph.getNodeById(node)?.imgs?.find((i) => i.src.includes('/view?')
          && new URL(i.src).searchParams.get('filename') === filename)
        if (!img || !img.complete || !img.naturalWidth) return null
        return { node, filename, width: img.naturalWidth, height: img.naturalHeight }
      }, out, { timeout: 20000, polling: 250 })
      .then((h) => h.jsonValue())
    result.node_images.push(shown)
  }
  if (!result.ui_outputs.length) throw new Error('the run gave no image output')
  // One of them in the Queue side panel, as a DOM <img> (the canvas draws node images, the panel shows tags). With
  // several output nodes the panel's cover is one of the run's images; which one follows the execution order of
  // independent output nodes, which ComfyUI does not fix.
  await page.locator('.queue-tab-button').click()
  const panelImage = page.locator(result.ui_outputs
    .map((o) => `img[src*="/view?"][src*="${encodeURIComponent(o.filename)}"]`).join(', ')).first()
  await panelImage.waitFor({ state: 'visible', timeout: 20000 })
  await page.waitForFunction((img) => img.complete && img.naturalWidth > 0, await panelImage.elementHandle())
  result.panel_image = await panelImage.evaluate((img) => ({ src: img.src, width: img.naturalWidth }))
  result.filename = new URL(result.panel_image.src).searchParams.get('filename')
  result.after_run = { dialogs: await visibleProblems(page), nodes: await nodeProblems(page) }
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'))
  await page.waitForTimeout(300)
  await shot(page, 'done')
}

// A workflow whose outputs are text only (LoRA inspect / convert): each Preview Any node (PreviewAny) shows the
// text its run sent, in its read-only preview widget (the frontend fills it in onExecuted).
async function showTexts(page) {
  if (!result.ui_texts.length) throw new Error('the run gave no image and no text output')
  result.stage = 'text'
  const sent = Object.fromEntries(result.ui_texts.map((t) => [t.node, t.text]))
  result.node_texts = await page
    .waitForFunction((sent) => {
      const shown = window.app.graph.nodes.filter((n) => n.type === 'PreviewAny')
        .map((n) => ({ node: String(n.id), text: n.widgets?.find((w) => w.name === 'preview')?.value ?? null }))
      return shown.length && shown.every((s) => s.text && s.text === sent[s.node]) ? shown : null
    }, sent, { timeout: 20000, polling: 250 })
    .then((h) => h.jsonValue())
  result.after_run = { dialogs: await visibleProblems(page), nodes: await nodeProblems(page) }
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'))
  await page.waitForTimeout(300)
  await shot(page, 'done')
}

const profile = mkdtempSync(join(tmpdir(), 'zimage-chromium-'))
let browser
try {
  // As root, headless, on a closed network: without the background-networking flags Chromium stalls.
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: args.chromium,
    headless: true,
    viewport: { width: 1600, height: 1000 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync']
  })
  const page = browser.pages()[0] ?? (await browser.newPage())
  page.setDefaultTimeout(timeout)
  page.on('console', (msg) => {
    if (msg.type() === 'error') result.console_errors.push({ text: msg.text(), url: msg.location().url ?? '' })
  })
  page.on('pageerror', (err) => result.page_errors.push(String(err?.stack ?? err)))
  page.on('requestfailed', (req) => result.failed_requests.push(`${req.method()} ${req.url()}: ${req.failure()?.errorText}`))

  await drive(page)
  result.stage = 'done'
} catch (err) {
  result.error = String(err?.stack ?? err)
  if (browser) {
    const page = browser.pages()[0]
    if (page) await shot(page, `failed-${result.stage}`).catch(() => {})
  }
} finally {
  await browser?.close().catch(() => {})
  rmSync(profile, { recursive: true, force: true })
  emit()
}
