//! OpenAPI 3.1 documents of both APIs, served at `/openapi.json`. Written by hand: the
//! surface is small, and it keeps a code-generation dependency out of the build.

use serde_json::{Value, json};

fn error_response() -> Value {
    json!({
        "type": "object",
        "required": ["error_type", "message", "details", "timestamp", "retryable"],
        "properties": {
            "error_type": { "type": "string", "enum": ["validation_error", "policy_error", "resource_exhausted", "circuit_open", "initialization_error", "generation_error", "storage_error", "timeout", "cancelled", "internal"] },
            "message": { "type": "string" },
            "details": {},
            "timestamp": { "type": "string", "format": "date-time" },
            "retryable": { "type": "boolean" }
        }
    })
}

fn op(summary: &str, body: bool) -> Value {
    let mut o = json!({
        "summary": summary,
        "responses": {
            "200": { "description": "OK", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Job" } } } },
            "4XX": { "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } } },
            "5XX": { "description": "Error", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorResponse" } } } }
        }
    });
    if body {
        o["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/RunRequest" } } } });
    }
    o
}

/// The Runpod-compatible local API.
pub fn local_api() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": { "title": "headshot worker: local API (Runpod-compatible)", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/v2/{endpoint}/run": { "post": op("Queue a job; answers {id, status: IN_QUEUE}", true) },
            "/v2/{endpoint}/runsync": { "post": op("Run a job and wait up to ?wait= ms", true) },
            "/v2/{endpoint}/status/{id}": { "get": op("Job status; IN_PROGRESS carries the latest progress as output", false) },
            "/v2/{endpoint}/stream/{id}": { "get": op("Progress chunks not handed out yet (each once)", false) },
            "/v2/{endpoint}/cancel/{id}": { "post": op("Cancel a queued or running job", false) },
            "/v2/{endpoint}/health": { "get": op("Job counts and worker state", false) },
            "/v2/{endpoint}/purge-queue": { "post": op("Cancel every queued job", false) },
            "/run": { "post": op("As /v2/{endpoint}/run", true) },
            "/runsync": { "post": op("As /v2/{endpoint}/runsync", true) },
            "/status/{id}": { "get": op("As /v2/{endpoint}/status/{id}", false) },
            "/files/{user}/{job}/{file}": { "get": { "summary": "A stored image, with ?expires=&sig= from a signed URL", "responses": { "200": { "description": "PNG" }, "403": { "description": "expired or tampered" } } } },
            "/healthz": { "get": { "summary": "Liveness", "responses": { "200": { "description": "alive" } } } },
            "/readyz": { "get": { "summary": "Readiness: model, storage, policies", "responses": { "200": { "description": "ready" }, "503": { "description": "not ready, with problems" } } } }
        },
        "components": { "schemas": {
            "ErrorResponse": error_response(),
            "RunRequest": {
                "type": "object", "required": ["input"], "additionalProperties": false,
                "properties": {
                    "id": { "type": "string", "description": "idempotency key; a repeated id with the same input returns the recorded job, with another input it is refused (422, /id)" },
                    "input": { "type": "object", "required": ["prompt", "user_id"], "additionalProperties": false, "properties": {
                        "prompt": { "type": "string" }, "user_id": { "type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]*$" },
                        "style": { "type": "string" }, "width": { "type": "integer", "multipleOf": 16 }, "height": { "type": "integer", "multipleOf": 16 },
                        "num_images": { "type": "integer", "minimum": 1 }, "steps": { "type": "integer" }, "num_inference_steps": { "type": "integer" },
                        "guidance": { "type": "number" }, "guidance_scale": { "type": "number" }, "seed": { "type": "integer", "minimum": 0 }
                    } }
                }
            },
            "Job": { "type": "object", "required": ["id", "status"], "properties": {
                "id": { "type": "string" },
                "status": { "type": "string", "enum": ["IN_QUEUE", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"] },
                "output": {}, "error": { "type": "string", "description": "an ErrorResponse as JSON text" },
                "delayTime": { "type": "integer" }, "executionTime": { "type": "integer" }, "workerId": { "type": "string" },
                "stream": { "type": "array", "items": { "type": "object", "properties": { "output": {} } } }
            } }
        } }
    })
}

/// The admin API.
pub fn admin_api() -> Value {
    let secured = |summary: &str| json!({ "summary": summary, "security": [{ "bearer": [] }], "responses": { "200": { "description": "OK" }, "401": { "description": "missing or wrong token" } } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "headshot worker: admin API", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/admin/policies": { "get": secured("Active policy of each slot, counters, rollback depth") },
            "/admin/policies/{kind}": { "post": secured("Upload a component (body: .wasm bytes); ?activate=false only stores it") },
            "/admin/policies/{kind}/history": { "get": secured("Stored versions and the slot's history") },
            "/admin/policies/{kind}/activate/{sha256}": { "post": secured("Activate a stored version") },
            "/admin/policies/{kind}/rollback": { "post": secured("Return to the previous version") },
            "/admin/jobs": { "get": secured("Job history: ?status=&user_id=&since_ms=&until_ms=&cursor=&limit=") },
            "/admin/jobs/{id}": { "get": secured("One job with timings, policies used and error") },
            "/admin/breakers": { "get": secured("Circuit breakers: storage and model") },
            "/admin/breakers/{name}/reset": { "post": secured("Close a breaker (storage or model; another name is 404)") },
            "/admin/breakers/{name}/force-open": { "post": secured("Hold a breaker open until reset (storage or model; another name is 404)") },
            "/admin/model": { "get": secured("Model state") },
            "/admin/model/reload": { "post": secured("Reload the model") },
            "/admin/resources": { "get": secured("GPU and system memory readings") },
            "/metrics": { "get": secured("Prometheus metrics") }
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": { "ErrorResponse": error_response() }
        }
    })
}
