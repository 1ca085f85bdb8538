#!/usr/bin/env bash
# Builds the image and brings the compose stack up with its demo cluster.
#   deploy/compose-up.sh [debug|release]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/docker/build.sh "${1:-release}"
docker-compose up -d
docker-compose logs form-keys | grep -E "API token" || true
echo "demo: curl http://demo.localhost:${FORM_HTTP_PORT:-8080}/whoami  (created by the form-demo service; docker-compose logs form-demo)"
