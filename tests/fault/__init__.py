"""The fault suite (issue 11): a fuzzer of the POST bodies and headers, a canary scan of
every sink, and SIGKILL/SIGTERM of the sidecar and its local workers, each against a real
``sidecar serve`` and the scripted fake provider."""
