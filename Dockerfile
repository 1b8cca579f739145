# GPU image: NGC PyTorch carries CUDA torch, Transformer-Engine and apex; we add megatron-core and this package.
# Build: docker build -t megatron-visualchat .
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megatron_visualchat
COPY setup.py README.md LICENSE pretrain_vchat.py ./
COPY megatron_visualchat ./megatron_visualchat
COPY tools ./tools
COPY examples ./examples
# Keep the image's CUDA torch: install our dependencies without letting pip replace torch/torchvision.
RUN pip install --no-cache-dir "megatron-core==0.16.1" sentencepiece timm safetensors psutil tqdm tensorboard \
        transformers \
    && pip install --no-cache-dir --no-deps -e .
ENV OMP_NUM_THREADS=8
CMD ["megatron-visualchat", "--help"]
