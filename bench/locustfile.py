"""A Locust file for users who prefer Locust to `floodwall bench`: a mix of the gateway's
calls as one user would make them, against a running stack (`floodwall up`).

    pip install locust                      # not a Floodwall dependency
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 \\
        --headless -u 20 -r 5 -t 60s        # or without --headless for the web UI

The key comes from FLOODWALL_KEY (default: the local demo key). Expect 429s when a user
mix exceeds the key's limits and 503s when admission sheds: both are the gateway working;
Locust counts them as failures unless you filter them (they carry `x-floodwall-error`).
"""

from __future__ import annotations

import os
import random
import time

from locust import HttpUser, between, task

KEY = os.environ.get("FLOODWALL_KEY", "fw-demo-key")
QUESTIONS = [
    "How do I rotate my API keys?",
    "What is the refund policy for annual plans?",
    "How do I export my data?",
]


class GatewayUser(HttpUser):  # type: ignore[misc]
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.client.headers.update({"authorization": f"Bearer {KEY}"})

    @task(5)
    def embed_fresh(self) -> None:
        text = f"sentence {random.random()} about gateways"
        self.client.post(
            "/v1/embeddings",
            json={"model": "embedder", "input": text},
            headers={"cache-control": "no-store"},
            name="embeddings (model)",
        )

    @task(2)
    def embed_cached(self) -> None:
        self.client.post(
            "/v1/embeddings",
            json={"model": "embedder", "input": "the same text"},
            name="embeddings (cache)",
        )

    @task(2)
    def chat(self) -> None:
        body = {
            "model": "sim-llm",
            "max_tokens": 32,
            "temperature": 0,
            "messages": [{"role": "user", "content": random.choice(QUESTIONS)}],
        }
        self.client.post("/v1/chat/completions", json=body, name="chat")

    @task(1)
    def batch_job(self) -> None:
        r = self.client.post(
            "/v1/jobs",
            name="jobs: submit",
            json={
                "requests": [
                    {"url": "/v1/embeddings", "body": {"model": "embedder", "input": f"job {i}"}}
                    for i in range(8)
                ]
            },
        )
        if r.status_code != 202:
            return
        location = r.headers["location"]
        for _ in range(50):
            s = self.client.get(location, name="jobs: poll").json()
            if s.get("status") in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(0.2)
