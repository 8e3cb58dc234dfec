"""Links between a Dagster materialization and what it made in MLflow (Dagster-free).

``link_run`` tags the training run, its LoggedModel and its registered version with the Dagster run id, the
asset's code version and the training partition (the registry search ``tags.dagster_run_id = '...'`` finds
the version a Dagster run made), and returns the MLflow UI addresses of the three, for the materialization's
metadata. A sqlite tracking store has no server of its own: the addresses are those of ``mlflow ui`` started
on it (``ui_url``, OMNISAGE_MLFLOW_UI_URL, default http://127.0.0.1:5000).
"""

from __future__ import annotations

from urllib.parse import quote


def ui_urls(
    ui_url: str, experiment_id: str, run_id: str, model_name: str, version: str, model_id: str
) -> dict[str, str]:
    """MLflow UI addresses: {"run", "model_version" (when registered), "logged_model" (when logged)}."""
    base = ui_url.rstrip("/")
    urls = {"run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}"}
    if version:
        urls["model_version"] = f"{base}/#/models/{quote(model_name, safe='')}/versions/{version}"
    if model_id:
        urls["logged_model"] = f"{base}/#/experiments/{experiment_id}/models/{model_id}"
    return urls


def link_run(
    tracking_uri: str,
    model_name: str,
    ui_url: str,
    *,
    run_id: str,
    version: str = "",
    model_id: str = "",
    tags: dict[str, str] | None = None,
) -> dict[str, str]:
    """Set ``tags`` on the run, its LoggedModel ``model_id`` and version ``version`` of ``model_name`` (each
    when given); -> ``ui_urls`` of them."""
    import mlflow
    from mlflow.entities import RunTag

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    if tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        if model_id:
            client.set_logged_model_tags(model_id, tags)
        for key, value in tags.items() if version else ():
            client.set_model_version_tag(model_name, version, key, value)
    experiment_id = client.get_run(run_id).info.experiment_id
    return ui_urls(ui_url, experiment_id, run_id, model_name, version, model_id)


def redacted_uri(uri: str) -> str:
    """``uri`` without the credentials of its user-info part (``https://user:secret@host`` -> ``https://***@host``),
    for metadata a UI shows; any other URI unchanged."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))
