# bevfusion-tiny: the bevfusion-r50 architecture, narrowed and shrunk for CPU tests and
# the embedded default run (a forward pass of about a second on 2 CPU cores).
# Same module classes and module paths as bevfusion-r50, so quantization rules, share
# groups and BN folding apply unchanged: ResNet Bottlenecks with a downsample in each
# stage (depth 14 = one block per stage, base width 16), the LSS FPN with 2 lateral/fpn
# convs and 2 concats, dtransform/depthnet/downsample, a SparseEncoder with
# SparseBasicBlocks and conv_input/conv_out, ConvFuser, SECOND with 2 blocks, SECONDFPN
# with a 1x1 conv and a ConvTranspose2d deblock, and the TransFusion head.
# Smaller: 128x352 images, 30 depth bins, 0.45 x 0.45 x 0.4 m voxels (30x30 BEV, even so
# SECOND's stride-2 block and its deconv round-trip), at most 16000 voxels (spconv's CPU
# cost grows with the voxel count, not the channels), fewer channels.

point_cloud_range = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
voxel_size = [0.45, 0.45, 0.4]
image_size = [128, 352]
out_size_factor = 8

model = dict(
    type="BEVFusion",
    encoders=dict(
        camera=dict(
            backbone=dict(
                type="BEVResNet",
                depth=14,
                base_channels=16,
                num_stages=4,
                out_indices=(1, 2, 3),
                style="pytorch",
                norm_cfg=dict(type="BN", requires_grad=True),
                norm_eval=False,
                frozen_stages=-1,
                zero_init_residual=False,
            ),
            neck=dict(
                type="GeneralizedLSSFPN",
                in_channels=[128, 256, 512],
                out_channels=64,
                norm_cfg=dict(type="BN2d"),
                act_cfg=dict(type="ReLU", inplace=True),
                upsample_cfg=dict(mode="bilinear", align_corners=False),
            ),
            vtransform=dict(
                type="DepthLSSTransform",
                in_channels=64,
                out_channels=32,
                image_size=image_size,
                feature_size=[image_size[0] // 8, image_size[1] // 8],
                xbound=[-54.0, 54.0, 1.8],
                ybound=[-54.0, 54.0, 1.8],
                zbound=[-10.0, 10.0, 20.0],
                dbound=[1.0, 60.0, 2.0],
                downsample=2,
                dtransform_channels=[8, 16, 32],
                depthnet_channels=64,
            ),
        ),
        lidar=dict(
            voxelize=dict(
                type="HardVoxelize",
                voxel_size=voxel_size,
                point_cloud_range=point_cloud_range,
                max_num_points=10,
                max_voxels=[16000, 16000],
            ),
            backbone=dict(
                type="BEVSparseEncoder",
                in_channels=5,
                sparse_shape=[240, 240, 21],
                base_channels=8,
                output_channels=64,
                order=("conv", "norm", "act"),
                norm_cfg=dict(type="BN1d", eps=1e-3, momentum=0.01),
                encoder_channels=[[8, 8, 16], [16, 16, 32], [32, 32, 64], [64, 64]],
                # z: 21 -> 11 -> 6 -> 3 (padded, unlike r50) -> conv_out -> 1
                encoder_paddings=[[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0]],
                block_type="basicblock",
                conv_out_kernel=[1, 1, 3],
                conv_out_stride=[1, 1, 2],
            ),
        ),
    ),
    fuser=dict(type="ConvFuser", in_channels=[32, 64], out_channels=64),
    decoder=dict(
        backbone=dict(
            type="SECOND",
            in_channels=64,
            out_channels=[64, 128],
            layer_nums=[2, 2],
            layer_strides=[1, 2],
            norm_cfg=dict(type="BN", eps=1e-3, momentum=0.01),
            conv_cfg=dict(type="Conv2d", bias=False),
        ),
        neck=dict(
            type="SECONDFPN",
            in_channels=[64, 128],
            out_channels=[64, 64],
            upsample_strides=[1, 2],
            norm_cfg=dict(type="BN", eps=1e-3, momentum=0.01),
            upsample_cfg=dict(type="deconv", bias=False),
            use_conv_for_no_stride=True,
        ),
    ),
    heads=dict(
        object=dict(
            type="TransFusionHead",
            in_channels=128,
            hidden_channel=32,
            num_classes=10,
            num_proposals=50,
            num_decoder_layers=1,
            num_heads=4,
            ffn_channel=64,
            dropout=0.1,
            activation="relu",
            nms_kernel_size=3,
            point_like_classes=[8, 9],
            common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
            head_conv=16,
            bbox_coder=dict(
                pc_range=point_cloud_range[:2],
                voxel_size=voxel_size[:2],
                out_size_factor=out_size_factor,
                post_center_range=[-61.2, -61.2, -10.0, 61.2, 61.2, 10.0],
                score_threshold=0.0,
            ),
        )
    ),
)

class_names = [
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
]

data = dict(
    image_size=image_size,
    point_cloud_range=point_cloud_range,
    voxel_size=voxel_size,
    sweeps_num=9,
    load_dim=5,
    use_dim=5,
    img_norm=dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    # 900x1600 * 0.24 = 216x384, cropped to 128x352 (bottom rows, centred columns)
    test_resize=0.24,
    train_aug=dict(
        resize_lim=[0.19, 0.275],
        rot_lim=[-5.4, 5.4],
        rand_flip=True,
        global_rot=[-0.785, 0.785],
        global_scale=[0.9, 1.1],
        global_translate_std=0.5,
    ),
    class_names=class_names,
)
