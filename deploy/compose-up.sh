#!/usr/bin/env bash
# Builds the image and brings the compose stack up with its demo cluster.
#   deploy/compose-up.sh [debug|release]
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/docker/build.sh "${1:-release}"
docker-compose up -d
echo "API token (admin): $(docker-compose run --rm --no-deps form-keys tokens --tokens-dir /tokens)"
echo "demo: curl http://demo.localhost:8080/whoami  (created by the form-demo service; docker-compose logs form-demo)"
