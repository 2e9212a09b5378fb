{{/*
Refuses variants whose engine block cannot fit the GPUs Ray may place them on, with the numbers
`amalia-serve plan` prints: files/capacity.yaml is generated from amalia_serve.capacity, and the
arithmetic below is the same as its `fit` (weights, the estimated reserve, whole 16-token KV blocks).
The chart cannot read the model PVC, so a variant names a built-in checkpoint (`checkpoint`, default
`capacity.checkpoint`); `custom` skips it. Ray places a replica on any worker group with enough GPUs
per worker, so every such group whose card is known (its `gpu`, or a MIG `gpuResourceName`) must
hold the variant.
*/}}
{{- define "amalia-serve.checkCapacity" -}}
{{- if .Values.capacity.enforce }}
{{- $cap := .Files.Get "files/capacity.yaml" | fromYaml }}
{{- range $v := .Values.variants }}
{{- $checkpoint := default $.Values.capacity.checkpoint $v.checkpoint }}
{{- if ne $checkpoint "custom" }}
{{- $ckpt := index $cap.checkpoints $checkpoint }}
{{- $engine := default dict $v.engine }}
{{- $maxLen := int64 (default $ckpt.maxModelLen $engine.max_model_len) }}
{{- if gt $maxLen (int64 $ckpt.maxModelLen) }}
{{- fail (printf "variant %s: max_model_len %d is beyond the checkpoint's %d (%s); set `checkpoint` to the variant's built-in checkpoint, or `custom` to skip this check" $v.name $maxLen (int64 $ckpt.maxModelLen) $checkpoint) }}
{{- end }}
{{- /* Weights as stored, or fp8 when a 16-bit checkpoint is quantized while loading (vLLM 0.32
takes the deprecated `fp8` for that too); a `quantization` the checkpoint contradicts is refused as
amalia_serve.capacity.quantization_conflict refuses it. */}}
{{- $format := $ckpt.storedAs }}
{{- $quantization := toString (default "" $engine.quantization) }}
{{- $online := has $quantization $cap.quantization.online }}
{{- if eq $format "bf16" }}
{{- if or $online (eq $quantization "fp8") }}
{{- $format = "fp8" }}
{{- else if has $quantization $cap.quantization.checkpoint }}
{{- fail (printf "variant %s: quantization %s reads an already quantized checkpoint; %s has no quantization_config. Set `checkpoint` to what modelPath holds (a quantized built-in checkpoint such as %s-int4), or `custom`" $v.name $quantization $checkpoint $checkpoint) }}
{{- end }}
{{- else if or $online (and (eq $quantization "fp8") (ne $format "fp8")) }}
{{- fail (printf "variant %s: quantization %s quantizes a 16-bit checkpoint while loading it; %s is already %s" $v.name $quantization $checkpoint $format) }}
{{- end }}
{{- $tp := int64 (default 1 $engine.tensor_parallel_size) }}
{{- $weights := div (add (int64 (index $ckpt.weightBytes $format)) (sub $tp 1)) $tp }}
{{- $kvDtype := toString (default "auto" $engine.kv_cache_dtype) }}
{{- $kvKey := ternary "fp8" "auto" (hasPrefix "fp8" $kvDtype) }}
{{- $kvHeads := int64 $ckpt.kvHeads }}
{{- $perToken := div (mul (int64 (index $ckpt.kvBytesPerToken $kvKey)) (div (add $kvHeads (sub $tp 1)) $tp)) $kvHeads }}
{{- $util := float64 (default $cap.defaults.gpuMemoryUtilization $engine.gpu_memory_utilization) }}
{{- $seqs := int64 (default $cap.defaults.maxNumSeqs $engine.max_num_seqs) }}
{{- $batched := int64 (default $cap.defaults.maxNumBatchedTokens $engine.max_num_batched_tokens) }}
{{- $activations := max (mul $batched (int64 $ckpt.activationBytesPerBatchedToken)) (mul $seqs (int64 $ckpt.samplerBytesPerSequence)) }}
{{- $reserve := add (int64 $cap.defaults.reserveFixedBytes) $activations }}
{{- range $g := $.Values.workerGroups }}
{{- if ge (int64 $g.gpusPerWorker) (int64 $v.gpus) }}
{{- $card := toString (default "" $g.gpu) }}
{{- if hasPrefix "nvidia.com/mig-" $g.gpuResourceName }}
{{- $profile := trimPrefix "nvidia.com/mig-" $g.gpuResourceName }}
{{- $card = ternary (printf "%s:%s" $card $profile) (toString (default "" (index $cap.migProfiles $profile))) (ne $card "") }}
{{- end }}
{{- $gpu := index $cap.gpus $card }}
{{- if $gpu }}
{{- $memory := mul (int64 $gpu.memoryMiB) 1048576 }}
{{- $budget := int64 (floor (mulf $memory $util)) }}
{{- $where := printf "variant %s cannot start on worker group %s (%s)" $v.name $g.name $card }}
{{- $why := printf "gpu_memory_utilization %g x %.2f GiB %s" $util (divf $memory 1073741824) $card }}
{{- $hint := printf "Ray may place the variant's replicas on any worker group with gpusPerWorker >= %d. See `amalia-serve plan --gpu %s`: quantized weights, a shorter max_model_len, fp8 KV cache or a larger card" (int64 $v.gpus) $card }}
{{- if gt $weights $budget }}
{{- fail (printf "%s: %s weights take %.2f GiB per GPU, more than the %.2f GiB vLLM may use (%s). %s" $where $format (divf $weights 1073741824) (divf $budget 1073741824) $why $hint) }}
{{- end }}
{{- $blockBytes := mul 16 $perToken }}
{{- $kvTokens := mul (div (max 0 (sub (sub $budget $weights) $reserve)) $blockBytes) 16 }}
{{- if lt $kvTokens $maxLen }}
{{- $kv := mul (div (add $maxLen 15) 16) $blockBytes }}
{{- $need := add (add $weights $reserve) $kv }}
{{- fail (printf "%s: one %d-token sequence does not fit: %s weights %.2f GiB + reserve %.2f GiB + its KV cache %.2f GiB = %.2f GiB > %.2f GiB (%s). %s" $where $maxLen $format (divf $weights 1073741824) (divf $reserve 1073741824) (divf $kv 1073741824) (divf $need 1073741824) (divf $budget 1073741824) $why $hint) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
