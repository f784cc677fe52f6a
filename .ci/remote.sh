# Shared by .ci/model-diff and .ci/publish (sourced, not run): the DVC remote, if any, and
# the outputs dvc.yaml keeps in git. Credentials come from the environment (repository
# secrets in CI), never from a file in git.

# The outputs dvc.yaml keeps in git (cache: false: metrics, plots, the report), one a line.
git_kept_outputs() {
  python -c 'from dvc.repo import Repo; print("\n".join(o.def_path for o in Repo().index.outs if not o.use_cache))'
}

# The default remote's URL; nothing (and status 1) where no remote is configured.
remote_url() {
  local name
  name=$(dvc remote default 2>/dev/null) || return 1
  dvc config "remote.$name.url"
}

# Install DVC's support for the remote's storage (dvc's own extras); a local path needs none.
install_remote_support() {
  local url scheme
  url=$(remote_url) || return 0
  scheme=${url%%://*}
  case "$scheme" in
    s3 | gs | azure | ssh) pip install --quiet "dvc[$scheme]" ;;
    "$url") ;;  # a local or mounted path
    *) echo "remote: no dvc extra known for '$scheme://'; install it yourself" >&2 ;;
  esac
}

# Pull what the remote has: the outputs dvc.lock names, and the run-cache's entries (small
# files; a stage's outputs follow only when `dvc repro --pull` restores it). Fails, with a
# note, where no remote is configured or it is unreachable (a fork's pull request has no
# secrets): the caller then computes instead.
pull_what_we_can() {
  remote_url >/dev/null || return 1
  if ! dvc pull --run-cache --allow-missing; then
    echo "remote: could not pull from the DVC remote; what is missing will be computed" >&2
    return 1
  fi
}
