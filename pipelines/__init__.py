"""kubellm.pipelines — the KFP side of kubellm: components, pipelines, compile/run/submit/schedule.

    kubellm compile --preset debug --output build/pipelines      # IR YAML for the Kubeflow UI
    kubellm run --local --preset debug                           # the whole pipeline via kfp.local
    kubellm submit --endpoint https://kfp.example.com --run-config run.yaml --wait
    kubellm schedule --endpoint ... --name weekly-report --cron "0 0 6 * * 1"

`pipelines/` is the package `kubellm.pipelines` (setuptools package-dir); the stage code it wraps is
`components/` (= `kubellm`). Only `components.py` and `definitions.py` import kfp's DSL; the code that
runs inside a component (`runtime.py`, `fingerprint.py`) does not.
"""
