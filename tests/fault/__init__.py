"""The fault suite (issue 11), each module against a real ``sidecar serve``:

* ``test_upstream``: every scripted upstream fault of the fake provider, stream and not;
* ``test_kill``: SIGKILL and SIGTERM of the sidecar and of its local workers under load;
* ``test_fuzz``: a property-based fuzzer of the POST bodies and of request headers;
* ``test_canary``: a scan of every sink for the configured secrets.

``support`` has what they share (a raw HTTP client, the sidecar's output reader)."""
