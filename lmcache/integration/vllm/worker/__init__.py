"""The worker half of the connector (one vLLM worker process per rank): connector.WorkerConnector
composes the saves, the loads and the layerwise part, each given what it needs."""
