# Sourced by tests/vm/test_vm.sh with the VM running (uses g, infer, say, fail, SSH_PORT, KEY, EXTRAS).
# Purges what `edged install` did, then applies deploy/ansible/site.yml twice: the second
# run must report changed=0.
AVENV=build/ansible-venv
if [[ ! -x $AVENV/bin/ansible-playbook ]]; then
  python3 -m venv "$AVENV" && "$AVENV/bin/pip" install -q ansible-core 2>&1 | grep -v '^WARNING: Location' || true
fi
[[ -x $AVENV/bin/ansible-playbook ]] || fail "ansible-core did not install into $AVENV"
g "systemctl disable --now edged >/dev/null 2>&1; /opt/edged/venv/bin/edged uninstall --purge >/dev/null; rm -rf /opt/edged/venv /etc/systemd/system/edged.service.d; systemctl daemon-reload"
say "guest purged (edged uninstall --purge, venv removed)"
cat > "$VM/inventory.ini" <<INV
[edged]
edged-vm ansible_host=127.0.0.1 ansible_port=$SSH_PORT ansible_user=root ansible_ssh_private_key_file=$PWD/$KEY ansible_python_interpreter=/usr/bin/python3 ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'
[edged:vars]
edged_hw_profile=generic-x86
edged_http_host=0.0.0.0
edged_http_allow_insecure=true
edged_pip_extra_args='--no-index --find-links /root/edged/vm/wheels'
INV
EXTRA_VARS="{\"edged_bundles\": [\"$PWD/build/demo-bundles/$BUNDLE\"]}"
for run in 1 2; do
  ANSIBLE_HOST_KEY_CHECKING=False ANSIBLE_NOCOLOR=1 "$AVENV/bin/ansible-playbook" -i "$VM/inventory.ini" \
    -e "$EXTRA_VARS" deploy/ansible/site.yml > "$VM/ansible-run$run.log" 2>&1 || { tail -40 "$VM/ansible-run$run.log"; fail "ansible run $run"; }
  recap=$(grep -A1 'PLAY RECAP' "$VM/ansible-run$run.log" | tail -1)
  say "ansible run $run: $recap"
done
grep -q 'changed=0 ' <<<"$recap" || { grep -B2 '^changed' "$VM/ansible-run2.log"; fail "second ansible run changed something"; }
[[ $(g systemctl is-active edged) == active ]] || fail "edged not active after ansible"
infer || fail "inference after ansible"
say "ansible: role applied, second run changed=0, inference answers"
