"""Examples shown by ``--help`` on every command (a test checks none is missing)."""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, list[str]] = {
    "": ["infrasim demo", "infrasim vm list -o json", "infrasim --data-dir /tmp/lab status"],
    "serve": ["infrasim serve", "infrasim serve --ssh 2222 --ssh-record",
              "infrasim serve --listen 127.0.0.1:7443",
              "infrasim serve --listen 0.0.0.0:7443 --tls-cert cert.pem --tls-key key.pem"],
    "vm": ["infrasim vm list", "infrasim vm create web-1 --kernel K --initrd I --start"],
    "vm create": ["infrasim vm create web-1 --kernel vmlinuz --initrd initrd.img --start",
                  "infrasim vm create web-2 --kernel K --initrd I --disk root --forward 8080:80",
                  "infrasim vm create node-1 --kernel K --initrd I --net lan --qos wan",
                  "infrasim vm create gw --kernel K --initrd I --net lan --net field "
                  "--qos field=radio",
                  "infrasim vm create pi --machine raspi3b --kernel K --initrd I --dtb D"],
    "vm list": ["infrasim vm list", "infrasim vm list -o json"],
    "vm get": ["infrasim vm get web-1", "infrasim vm get web-1 -o json"],
    "vm start": ["infrasim vm start web-1", "infrasim vm start web-1 --paused"],
    "vm stop": ["infrasim vm stop web-1", "infrasim vm stop web-1 --timeout 10",
                "infrasim vm stop web-1 --force"],
    "vm pause": ["infrasim vm pause web-1"],
    "vm resume": ["infrasim vm resume web-1"],
    "vm restart": ["infrasim vm restart web-1", "infrasim vm restart web-1 --force"],
    "vm delete": ["infrasim vm delete web-1", "infrasim vm delete web-1 --force"],
    "vm watch": ["infrasim vm watch", "infrasim vm watch web-1 --metrics",
                 "infrasim vm watch -o json --since 42"],
    "network": ["infrasim network list"],
    "network create": ["infrasim network create lan --mode user --subnet 10.0.2.0/24",
                       "infrasim network create lab --mode segment --subnet 10.10.0.0/24"],
    "network list": ["infrasim network list -o json"],
    "network get": ["infrasim network get lan"],
    "network delete": ["infrasim network delete lan"],
    "lora": ["infrasim lora airtime --sf 9 --payload 20"],
    "lora airtime": ["infrasim lora airtime --sf 7 --bw 125 --cr 4/5 --payload 13",
                     "infrasim lora airtime --sf 12 --payload 51 -o json"],
    "network stats": ["infrasim network stats", "infrasim network stats lan --watch",
                      "infrasim network stats lan -o json"],
    "qos": ["infrasim qos list"],
    "qos create": ["infrasim qos create wan --rate 8mbit --burst 32kb --delay 40ms --jitter 5ms "
                   "--distribution normal --loss 1%",
                   "infrasim qos create flaky --loss gemodel:1%,30% --duplicate 0.1% "
                   "--reorder 1% --seed 42",
                   "infrasim qos create radio --lora-sf 9 --lora-bw 125 --lora-cr 4/5 "
                   "--lora-distance 2km --lora-duty-cycle 1%"],
    "qos update": ["infrasim qos update wan --rate 2mbit",
                   "infrasim qos update radio --lora-sf 12", "infrasim qos update radio --no-lora"],
    "qos list": ["infrasim qos list -o json"],
    "qos get": ["infrasim qos get wan"],
    "qos delete": ["infrasim qos delete wan"],
    "volume": ["infrasim volume list"],
    "volume create": ["infrasim volume create data --size 2G",
                      "infrasim volume create base --from ./disk.img --read-only",
                      "infrasim volume create root --base base",
                      "infrasim volume create llm --from weights.bin --kind weights"],
    "volume list": ["infrasim volume list -o json"],
    "volume get": ["infrasim volume get base"],
    "volume resize": ["infrasim volume resize data 4G"],
    "volume delete": ["infrasim volume delete data"],
    "volume sign": ["infrasim volume sign base"],
    "volume verify": ["infrasim volume verify base"],
    "image": ["infrasim image list"],
    "image list": ["infrasim image list -o json"],
    "image gc": ["infrasim image gc"],
    "key": ["infrasim key list"],
    "key list": ["infrasim key list"],
    "key add": ["infrasim key add vendor $(cat vendor.pub)"],
    "key remove": ["infrasim key remove vendor"],
    "key protect": ["INFRASIM_KEY_PASSPHRASE=… infrasim key protect", "infrasim key protect"],
    "snapshot": ["infrasim snapshot tree web-1"],
    "snapshot create": ["infrasim snapshot create web-1 before-upgrade --description 'known good'"],
    "snapshot restore": ["infrasim snapshot restore web-1 before-upgrade",
                         "infrasim snapshot restore web-1 before-upgrade --keep-current"],
    "snapshot delete": ["infrasim snapshot delete web-1 before-upgrade"],
    "snapshot get": ["infrasim snapshot get web-1 before-upgrade"],
    "snapshot list": ["infrasim snapshot list web-1"],
    "snapshot tree": ["infrasim snapshot tree web-1"],
    "snapshot verify": ["infrasim snapshot verify web-1"],
    "console": ["infrasim console web-1", "infrasim console web-1 --log"],
    "status": ["infrasim status", "infrasim status -o json"],
    "version": ["infrasim version"],
    "completion": ["infrasim completion bash > /etc/bash_completion.d/infrasim",
                   "infrasim completion zsh > ~/.zfunc/_infrasim"],
    "guest": ["infrasim guest build"],
    "guest build": ["infrasim guest build --flavour all -o json"],
    "demo": ["infrasim demo", "infrasim demo --no-attach"],
    "terraform": ["infrasim terraform install"],
    "terraform install": ["infrasim terraform install -o json",
                          "TF_CLI_CONFIG_FILE=$(infrasim terraform install -o json | jq -r "
                          ".cli_config) terraform init"],
    "ssh-key": ["infrasim ssh-key add ~/.ssh/id_ed25519.pub --role operator"],
    "ssh-key add": ["infrasim ssh-key add ~/.ssh/id_ed25519.pub --role operator",
                    "infrasim ssh-key add bob.pub --role viewer --comment bob"],
    "ssh-key list": ["infrasim ssh-key list", "infrasim ssh-key list -o json"],
    "ssh-key remove": ["infrasim ssh-key remove SHA256:IjlfJE3g", "infrasim ssh-key remove bob"],
    "ui": ["infrasim", "infrasim ui --read-only", "infrasim ui --vm web-1 --theme light"],
}


def walk(parser: argparse.ArgumentParser, path: str = "") -> list[tuple[str,
                                                                     argparse.ArgumentParser]]:
    out = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                out += walk(sp, f"{path} {name}".strip())
    return out


def add_examples(parser: argparse.ArgumentParser) -> None:
    for path, p in walk(parser):
        lines = EXAMPLES.get(path)
        if lines:
            p.epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
            p.formatter_class = argparse.RawDescriptionHelpFormatter
