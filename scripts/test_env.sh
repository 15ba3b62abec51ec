# Sourced by `make test`. In CI (CI=true) the service-backed tests must run, never skip.
if [ "${CI:-}" = "true" ]; then
  export MIRRORGATE_REQUIRE_SERVICES=1
fi
