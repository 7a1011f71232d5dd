# Drives `headshot serve --port 18000` with the unmodified Runpod Python client (pip install runpod).
# Usage: headshot serve --port 18000 --admin-port 18001 & python scripts/runpod_client_check.py
import runpod, time
runpod.api_key = "anything"
runpod.endpoint_url_base = "http://127.0.0.1:18000/v2"
ep = runpod.Endpoint("local")
inp = {"prompt": "a founder in a navy blazer", "user_id": "alice", "width": 64, "height": 64}
out = ep.run_sync(inp, timeout=60)
print("run_sync ->", sorted(out.keys()), out["images"][0]["url"][:60])
job = ep.run({"input": dict(inp, steps=20, width=256, height=256)})
print("run ->", job.job_id, job.status())
print("output ->", sorted(job.output(timeout=60).keys()))
job2 = ep.run({"input": dict(inp, steps=20, width=256, height=256)})
chunks = list(job2.stream())
print("stream chunks ->", len(chunks), chunks[:1])
job3 = ep.run({"input": dict(inp, steps=50, width=256, height=256)})
job4 = ep.run({"input": inp})
print("cancel ->", job4.cancel())
print("health ->", ep.health())
print("purge ->", ep.purge_queue())
print("status after cancel ->", job4.status())
bad = ep.run_sync({"prompt": "x", "user_id": "../etc"}, timeout=60)
print("run_sync invalid ->", bad)
