"""The ``ray`` connection: where a Ray head's job API is and its token.

A connection of type ``ray`` holds the head's host (``head.example.com``, or a full
``https://head.example.com``), its port (default 8265) and the token as its password;
extra ``{"scheme": "https"}`` selects https for a bare host. Set it in the UI, or as
``AIRFLOW_CONN_RAY_DEFAULT='{"conn_type": "ray", "host": "head", "port": 8265,
"password": "<token>"}'``. A connection without a password falls back to the worker's
``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook


class RayJobHook(BaseHook):
    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray job API (batchjobs)"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any):
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login"],
            "relabeling": {"password": "Token", "host": "Head (host or http(s)://host)"},
            "placeholders": {"port": "8265", "extra": '{"scheme": "https"}'},
        }

    def target(self) -> dict[str, Any]:
        """Keyword arguments for ``batchjobs.ops.jobs`` (address, token, token_source)."""
        return self.target_of(self.get_connection(self.ray_conn_id), self.ray_conn_id)

    async def atarget(self) -> dict[str, Any]:
        return self.target_of(await self.aget_connection(self.ray_conn_id), self.ray_conn_id)

    @staticmethod
    def target_of(conn, conn_id: str) -> dict[str, Any]:
        host = (conn.host or "127.0.0.1").rstrip("/")
        if "://" not in host:
            scheme = (conn.extra_dejson or {}).get("scheme", "http")
            host = f"{scheme}://{host}"
        port = conn.port or (None if host.count(":") > 1 else 8265)
        address = f"{host}:{port}" if port else host
        return {
            "address": address,
            "token": conn.password or None,
            "token_source": f"the Airflow connection {conn_id}'s password",
        }
